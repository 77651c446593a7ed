"""Quiet output: library warnings that are not the user's business are silenced here, narrowly (by message), before
the libraries load; everything else, and every real problem, still reaches the user.
"""
from __future__ import annotations

import logging
import sys
import warnings

# (message regex, category): each names one known, harmless notice
SILENCED = [
    # lightning_fabric/__init__.py imports pkg_resources for a namespace package; nothing for a user to change
    (r"pkg_resources is deprecated as an API", UserWarning),
    (r"Deprecated call to `pkg_resources\.declare_namespace", DeprecationWarning),
    # Lightning's hint for more DataLoader workers: our samples are slices of a memory-mapped array, so
    # train.num_workers is a deliberate recipe choice (docs/PERFORMANCE.md), not a bottleneck to report
    (r"The dataloader, \w+, does not have many workers", UserWarning),
    # Lightning 1.9.5's all_gather (multi-process CPU runs) calls a torch API that torch now marks deprecated
    (r"torch\.distributed\.nn\.functional\.all_gather is deprecated", FutureWarning),
]


# huggingface_hub logs every retried or resumed transfer as a warning ("Error while downloading from ...: ...").
# Those recover by themselves, and a download that finally fails is our one `error:` line (rwkv7/data/fetch.py).
HUB_RETRY_LOGGERS = ("huggingface_hub.file_download", "huggingface_hub.utils._http")


def install() -> None:
    for message, category in SILENCED:
        warnings.filterwarnings("ignore", message=message, category=category)


def quiet_hub_retries() -> None:
    for name in HUB_RETRY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def teardown() -> None:
    """Destroy a process group left by Lightning, so torch does not warn at exit that nobody did."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - the run is over; a failed teardown must not change its exit code
            pass
