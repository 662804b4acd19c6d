"""Helpers shared by the tests: free ports and multi-process runs that stay on the CPU.

The multi-process tests exercise gloo on the CPU. On a machine with fewer GPUs than processes
the recipes would (rightly) refuse to start, so the helpers hide the GPUs from the children.
"""

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Sequence


def free_port() -> int:
    """A TCP port that was free a moment ago, for a rendezvous on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_only_env() -> Dict[str, str]:
    """This process's environment with the GPUs hidden and one OpenMP thread per process."""
    return {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}


def hide_gpus() -> None:
    """Hides the GPUs from this (freshly spawned) process before it touches CUDA."""
    os.environ["CUDA_VISIBLE_DEVICES"] = ""


def run_torchrun(recipe: Path, output_dir: Path, opts: Sequence[str], nproc: int = 2,
                 timeout: int = 300) -> subprocess.CompletedProcess:
    """Runs ``recipe`` under ``torchrun --nproc_per_node=nproc`` on the CPU (gloo).

    Returns:
        subprocess.CompletedProcess: with text ``stdout`` and ``stderr``.
    """
    cmd: List[str] = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                      f"--master_port={free_port()}", str(recipe), "--output-dir", str(output_dir),
                      "--opts", *opts]
    return subprocess.run(cmd, env=cpu_only_env(), capture_output=True, text=True, timeout=timeout)


# Encoder sizes that keep a recipe test at a few seconds (the "tiny" preset, narrower).
# A very small ALBEF (pass with preset "tiny") for unit tests that build several model copies.
SMALL_ALBEF = dict(image_size=32, patch_size=8, vision_width=48, vision_depth=2, vision_heads=2,
                   vision_mlp_dim=96, text_width=48, text_layers=1, fusion_layers=2, text_heads=2,
                   text_ffn_dim=96, vocab_size=64, embed_dim=16)

def small_albef_batch(batch: int = 4, length: int = 7):
    """Images ``[B, 3, 32, 32]``, ids and a 1/0 mask ``[B, L]`` with two padded captions, for
    :data:`SMALL_ALBEF` models (fixed seed)."""
    import torch

    gen = torch.Generator().manual_seed(1)
    image = torch.randn(batch, 3, 32, 32, generator=gen)
    ids = torch.randint(5, 64, (batch, length), generator=gen)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1, 4:] = 0
    mask[3, 5:] = 0
    return image, ids.masked_fill(mask == 0, 0), mask


TINY_ENCODER_OPTS = ["model.vision_width=64", "model.vision_heads=2", "model.vision_mlp_dim=128",
                     "model.text_width=64", "model.text_heads=2", "model.text_ffn_dim=128"]


def shapes_world_opts(cache: Path, num_train: int = 40, num_eval: int = 10) -> List[str]:
    """Config overrides for a small shapes world cached in ``cache``, loaded in-process."""
    return [f"data.shapes.cache_dir={cache}", f"data.shapes.num_train={num_train}",
            f"data.shapes.num_val={num_eval}", f"data.shapes.num_test={num_eval}", "train.num_workers=0"]
