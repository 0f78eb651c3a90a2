"""Data loading: image and mask decoding, preprocessing, datasets and synthetic data.

The public names are re-exported here; see [`cncad.data.transforms`][cncad.data.transforms],
[`cncad.data.folder`][cncad.data.folder], [`cncad.data.synthetic`][cncad.data.synthetic],
[`cncad.data.cache`][cncad.data.cache] and [`cncad.data.sampling`][cncad.data.sampling] for
details.
"""

from cncad.data.cache import FeatureCache, remove_stale_cache_files
from cncad.data.folder import (
    MASK_EXTENSIONS,
    NORMAL_FOLDER_NAMES,
    AnomalyFolder,
    AnomalySample,
    ImageFolderDataset,
    MaskPolicy,
    find_categories,
    open_dataset,
)
from cncad.data.sampling import epoch_batches
from cncad.data.synthetic import (
    DEFECT_TYPES,
    SYNTHETIC_CATEGORIES,
    make_synthetic_dataset,
    synthetic_sample,
)
from cncad.data.transforms import (
    CLIP_MEAN,
    CLIP_STD,
    IMAGE_EXTENSIONS,
    NORMALIZED_LIMIT,
    ImageInput,
    ImageReadError,
    check_model_batch,
    denormalize,
    is_image_file,
    load_image,
    load_mask,
    preprocess,
    resize_mask,
    to_image_tensor,
)

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "DEFECT_TYPES",
    "IMAGE_EXTENSIONS",
    "MASK_EXTENSIONS",
    "NORMALIZED_LIMIT",
    "NORMAL_FOLDER_NAMES",
    "SYNTHETIC_CATEGORIES",
    "AnomalyFolder",
    "AnomalySample",
    "FeatureCache",
    "ImageFolderDataset",
    "ImageInput",
    "ImageReadError",
    "MaskPolicy",
    "check_model_batch",
    "denormalize",
    "epoch_batches",
    "find_categories",
    "is_image_file",
    "load_image",
    "load_mask",
    "make_synthetic_dataset",
    "open_dataset",
    "preprocess",
    "remove_stale_cache_files",
    "resize_mask",
    "synthetic_sample",
    "to_image_tensor",
]
