"""Calibrate a VMamba on several processes and write one merged profile.

    torchrun --nproc_per_node=2 examples/distributed_calibration.py --out profile.json

Each rank calibrates its own shard of the data (a DistributedSampler splits it), the per-site
statistics are merged exactly across ranks, and rank 0 writes the profile; every rank ends up
holding the same merged profile. Replace the model and the random images with your own: the
weights must be identical on every rank (load the same checkpoint), the data need not be.
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from vmeanba_compiler import calibrate_distributed
from vmeanba_compiler.models import build_vmamba


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="profile.json", help="where rank 0 writes the merged profile")
    parser.add_argument("--backend", default="gloo", help="torch.distributed backend (gloo for CPU)")
    parser.add_argument("--images", type=int, default=16, help="calibration images in total")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--size", type=int, default=32, help="image height and width")
    args = parser.parse_args()

    dist.init_process_group(args.backend)  # rank and world size come from torchrun's environment
    try:
        torch.manual_seed(0)  # the same weights on every rank (in practice: load one checkpoint)
        model = build_vmamba("vmamba_mini").eval()
        images = torch.randn(args.images, 3, args.size, args.size, generator=torch.Generator().manual_seed(1))
        sampler = DistributedSampler(TensorDataset(images), shuffle=False)
        loader = DataLoader(TensorDataset(images), batch_size=args.batch_size, sampler=sampler)
        profile = calibrate_distributed(model, (batch for (batch,) in loader), path=args.out)
        if dist.get_rank() == 0:
            print(f"{dist.get_world_size()} ranks, {profile.num_batches} batches, {profile.num_samples} images "
                  f"-> {args.out}")
            for site in profile.site_ids:
                print(f"  {site}: ratio {profile.metric(site, 'ratio'):.4g}, "
                      f"relative error {profile.metric(site, 'relative_error'):.4g}")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
