"""Benchmark: naive vs fused anomaly-map scoring (cncad.scoring.anomaly_map).

The naive pipeline is what RD-style code usually does: per layer
``1 - F.cosine_similarity`` -> ``F.interpolate`` to full resolution -> sum -> Gaussian
blur (separable, scipy-style 'reflect' border, radius int(4 sigma + 0.5)). The fused
version is ``cncad.scoring.anomaly_map``. The "floor" is the time of reading every input
tensor once (a ``sum`` of each), the least any implementation has to do.

Peak memory is the peak *extra* memory above the inputs: on CUDA from
``torch.cuda.max_memory_allocated`` after a reset; on CPU from the ``ru_maxrss``
high-water mark of a fresh subprocess per variant (inputs created in place, lazy
initialisation done on a tiny input first), since tracemalloc does not see torch's
allocations. Times are the best (and median) of ``--repeats`` runs after warm-up, the
variants taking turns; on CUDA they are measured with CUDA events.

Usage::

    python benchmarks/bench_scoring.py                      # CPU, and CUDA if available
    python benchmarks/bench_scoring.py --device cuda --repeats 50 --dtype float16
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from cncad.scoring import anomaly_map

CASES = {
    # name: (layer shapes, out_size); tokens are (B, L, C), maps are (B, C, h, w)
    "vitl-224": ([("tok", 256, 1024)] * 3, 224),
    "vitl-256": ([("tok", 256, 1024)] * 3, 256),
    "cnn-256": ([("map", 256, 64), ("map", 512, 32), ("map", 1024, 16)], 256),
}


# ----------------------------------------------------------------------------- inputs


def make_inputs(case: str, batch: int, dtype: torch.dtype, device: str, seed: int = 0):
    """Inputs created in place (no temporaries, so the memory baseline is clean)."""
    layers, out = CASES[case]
    gen = torch.Generator(device=device).manual_seed(seed)
    enc, dec = [], []
    for kind, c, side in layers:
        # for tokens "side" holds the token count L
        shape = (batch, side, c) if kind == "tok" else (batch, c, side, side)
        e = torch.empty(shape, dtype=dtype, device=device).normal_(generator=gen)
        d = torch.empty(shape, dtype=dtype, device=device).normal_(generator=gen)
        d.mul_(0.5).add_(e)  # decoder output ~ encoder features plus an error
        enc.append(e)
        dec.append(d)
    return enc, dec, out


# ----------------------------------------------------------------------- naive pipeline


def _reflect_index(n: int, radius: int, device) -> torch.Tensor:
    """Indices of a signal padded by ``radius`` with scipy's 'reflect' (d c b a | a b c d)."""
    idx = torch.arange(-radius, n + radius, device=device)
    j = torch.remainder(idx, 2 * n)
    return torch.where(j >= n, 2 * n - 1 - j, j)


def naive_blur(x: torch.Tensor, sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """Separable Gaussian blur of (B, 1, H, W) with scipy's default reflect border."""
    if sigma == 0:
        return x
    radius = int(truncate * sigma + 0.5)
    k = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (k / sigma) ** 2)
    k = (k / k.sum()).to(x.dtype).to(x.device)
    h, w = x.shape[-2:]
    x = x.index_select(2, _reflect_index(h, radius, x.device))
    x = F.conv2d(x, k.view(1, 1, -1, 1))
    x = x.index_select(3, _reflect_index(w, radius, x.device))
    return F.conv2d(x, k.view(1, 1, 1, -1))


def naive_anomaly_map(enc, dec, out_size, sigma=4.0, align_corners=False):
    total = None
    for e, d in zip(enc, dec, strict=True):
        if e.ndim == 3:  # (B, L, C) tokens on a square grid
            b, length, _ = e.shape
            side = math.isqrt(length)
            m = (1 - F.cosine_similarity(e, d, dim=-1)).reshape(b, 1, side, side)
        else:  # (B, C, h, w) maps
            m = (1 - F.cosine_similarity(e, d, dim=1)).unsqueeze(1)
        m = F.interpolate(
            m.float(), size=(out_size, out_size), mode="bilinear", align_corners=align_corners
        )
        total = m if total is None else total + m
    return naive_blur(total, sigma)[:, 0]


def read_floor(enc, dec):
    return [t.sum() for t in (*enc, *dec)]


def variants(device: str):
    v = {
        "naive": lambda enc, dec, out: naive_anomaly_map(enc, dec, out),
        "fused": lambda enc, dec, out: anomaly_map(enc, dec, out),
        "floor": lambda enc, dec, out: read_floor(enc, dec),
    }
    if device.startswith("cuda"):
        v["fused[elementwise]"] = lambda enc, dec, out: anomaly_map(
            enc, dec, out, cosine_kernel="elementwise"
        )
        v["fused[gemm]"] = lambda enc, dec, out: anomaly_map(enc, dec, out, cosine_kernel="gemm")
    return v


# ------------------------------------------------------------------------------ timing


def _time_once(fn, args, device: str) -> float:
    if device.startswith("cuda"):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn(*args)
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn(*args)
    return (time.perf_counter() - t0) * 1e3


def time_variants(fns: dict, args, device: str, repeats: int, warmup: int = 2) -> dict:
    """(best, median) ms per variant; the variants take turns, so that noise from other
    processes on the machine hits all of them alike."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    with torch.inference_mode():
        for fn in fns.values():
            for _ in range(warmup):
                fn(*args)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        for _ in range(repeats):
            for k, fn in fns.items():
                times[k].append(_time_once(fn, args, device))
    return {k: (min(v), statistics.median(v)) for k, v in times.items()}


def cuda_peak_mb(fn, args) -> float:
    with torch.inference_mode():
        fn(*args)  # warm (operator cache, cuBLAS handles)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn(*args)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20


def _proc_status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Resets the kernel's peak-RSS mark of this process to its current RSS (Linux)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_bytes() -> int:
    hwm = _proc_status_kb("VmHWM")  # per address space, so not inherited from the parent
    if hwm is not None:
        return hwm * 1024
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def cpu_peak_child(case: str, variant: str, batch: int, dtype: str, threads: int) -> None:
    """Runs in a fresh process: prints the peak extra RSS (MB) of one call of a variant."""
    torch.set_num_threads(threads)
    dt = getattr(torch, dtype)
    fn = variants("cpu")[variant]
    with torch.inference_mode():
        small = make_inputs(case, 1, dt, "cpu")  # lazy initialisation on a tiny batch
        fn(*small)
        del small
        args = make_inputs(case, batch, dt, "cpu")
        if _reset_peak_rss():
            rss = _proc_status_kb("VmRSS")
            base = rss * 1024 if rss is not None else _peak_rss_bytes()
        else:
            base = _peak_rss_bytes()
        out = fn(*args)
        peak = _peak_rss_bytes()
    del out
    print(json.dumps({"peak_mb": (peak - base) / 2**20}))


def cpu_peak_mb(case: str, variant: str, batch: int, dtype: str, threads: int) -> float:
    if _proc_status_kb("VmHWM") is None:
        try:
            import resource  # noqa: F401
        except ImportError:  # Windows: no peak-RSS counter without extra packages
            return float("nan")
    cmd = [sys.executable, __file__, "--_child", case, variant, str(batch), dtype, str(threads)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        print(f"  (memory child for {variant} failed: {res.stderr.strip()[-300:]})")
        return float("nan")
    return json.loads(res.stdout.strip().splitlines()[-1])["peak_mb"]


# ------------------------------------------------------------------------------- main


def run_device(device: str, args) -> None:
    dtype = getattr(torch, args.dtype)
    vs = variants(device)
    name = torch.cuda.get_device_name(device) if device.startswith("cuda") else "CPU"
    print(
        f"\n== device {device} ({name}), torch {torch.__version__}, threads "
        f"{torch.get_num_threads()}, batch {args.batch}, dtype {args.dtype}, sigma 4, "
        f"best (median) of {args.repeats} ms =="
    )
    fused_names = [k for k in vs if k.startswith("fused")]
    for case in args.cases:
        enc, dec, out = make_inputs(case, args.batch, dtype, device)
        inputs = (enc, dec, out)
        in_mb = sum(t.numel() * t.element_size() for t in (*enc, *dec)) / 2**20
        with torch.inference_mode():
            # reference in fp32 from the same (possibly low-precision) inputs
            ref = naive_anomaly_map([t.float() for t in enc], [t.float() for t in dec], out)
            diffs = {k: (vs[k](*inputs) - ref).abs().max().item() for k in fused_names}
        res = time_variants(vs, inputs, device, args.repeats)
        mem = {}
        if not args.no_memory:
            for k in ["naive", *fused_names]:
                if device.startswith("cuda"):
                    mem[k] = cuda_peak_mb(vs[k], inputs)
                else:
                    mem[k] = cpu_peak_mb(case, k, args.batch, args.dtype, torch.get_num_threads())
        floor = res["floor"][0]
        naive = res["naive"][0]
        print(f"\n[{case}] inputs {in_mb:.0f} MB, out {out}x{out}")
        print(f"  floor (read inputs once): {floor:9.2f} ({res['floor'][1]:.2f}) ms")
        nm = mem.get("naive", float("nan"))
        print(f"  {'naive':<24}: {naive:9.2f} ({res['naive'][1]:.2f}) ms, peak +{nm:.1f} MB")
        for k in fused_names:
            t, med = res[k]
            fm = mem.get(k, float("nan"))
            print(
                f"  {k:<24}: {t:9.2f} ({med:.2f}) ms, peak +{fm:.1f} MB | "
                f"speedup {naive / t:5.1f}x, memory {nm / fm:5.1f}x less, "
                f"{t / floor:4.2f}x floor, max|diff| {diffs[k]:.1e}"
            )
        t = res["fused"][0]
        fm = mem.get("fused", float("nan"))
        spec = args.batch == 32 and args.dtype == "float32"  # the shapes the goals are for
        if not spec:
            goals = []
        elif device == "cpu" and case.startswith("vitl"):
            goals = [
                ("speed >= 4x naive", naive / t >= 4),
                ("memory >= 4x less", nm / fm >= 4),
                ("<= 3x floor", t / floor <= 3),
            ]
        elif device.startswith("cuda"):
            goals = [("<= 2x floor", t / floor <= 2)]
        else:
            goals = []
        if goals:
            print("  goals: " + ", ".join(f"{g}: {'MET' if ok else 'NOT MET'}" for g, ok in goals))
        del enc, dec, inputs, ref
        if device.startswith("cuda"):
            torch.cuda.empty_cache()


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--_child":
        case, variant, batch, dtype, threads = sys.argv[2:7]
        cpu_peak_child(case, variant, int(batch), dtype, int(threads))
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="all", help="cpu, cuda, cuda:N or all (default)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per variant")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--no-memory", action="store_true", help="skip peak-memory measurement")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    # Exact fp32 on CUDA for the max|diff| check: cuDNN convolutions (the naive blur) use
    # TF32 by default; matmuls (the fused products) do not.
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    if args.device == "all":
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    else:
        devices = [args.device]
    for dev in devices:
        run_device(dev, args)


if __name__ == "__main__":
    main()
