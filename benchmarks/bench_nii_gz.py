#!/usr/bin/env python
"""Writing ``.nii.gz`` outputs: ITK's writer (it compresses on one core) against
:func:`mgr_engine.itk_io.write_image` (the ``.nii``'s bytes laid out from the image,
:func:`mgr_engine.itk_io.gzip_file` compresses them on every core), in one run.

For each image: the time and size of ITK's ``.nii.gz``; of ITK's ``.nii`` and of ours; of the
previous ``write_image`` (ITK's ``.nii``, then ``gzip_file`` of the file); then of ours with each
deflate module (the standard library's zlib at level 1, ISA-L at level 2 where ``isal`` imports)
on one thread and on all of them; each checked to decompress to ITK's bytes. Median of ``--repeats``; the files
go to ``--workdir`` (the page cache makes a second write of the same size cheaper, so the first
of each is a warm-up).

    mgr-engine register ... --displacement_field_out field.nrrd --jacobian_out jac.nrrd --warped_moving_out warped.nrrd
    python benchmarks/bench_nii_gz.py --images field.nrrd jac.nrrd warped.nrrd --results benchmarks/RESULTS.md
    python benchmarks/bench_nii_gz.py       # synthetic images, a quick check
"""

from __future__ import annotations

import argparse
import gzip
import platform
import sys
import tempfile
import zlib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]

import bench_kernels  # noqa: E402
from bench_kernels import print_and_append  # noqa: E402


def synthetic_images(shape):
    """An int16 CT-like image, a displacement field and a Jacobian determinant of ``shape``
    (z, y, x): smooth, with noise in the low bits as a registration's outputs have."""
    import itk
    import torch

    from mgr_engine import itk_io

    g = torch.Generator().manual_seed(0)

    def smooth(channels):
        coarse = torch.randn(1, channels, 6, 6, 6, generator=g)
        return torch.nn.functional.interpolate(coarse, size=shape, mode="trilinear")[0]

    ct = (smooth(1)[0] * 400 + torch.randn(shape, generator=g) * 20).clamp(-1024, 3000).to(torch.int16)
    field = (smooth(3) * 5).permute(1, 2, 3, 0).contiguous()
    jacobian = 1 + 0.1 * smooth(1)[0] + 0.001 * torch.randn(shape, generator=g)
    ct_image = itk.image_from_array(ct.numpy())
    return {"CT-like int16": ct_image,
            "displacement field": itk_io.image_like(field.numpy(), ct_image, is_vector=True),
            "Jacobian determinant": itk_io.image_like(jacobian.numpy(), ct_image)}


def timed(fn, repeats):
    """Median seconds of ``repeats`` runs after one warm-up (ITK's one-core writes take half a
    minute at CT size)."""
    return bench_kernels.timed(fn, "cpu", repeats, warmups=1)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", nargs="+", type=Path, help="images to write (default: synthetic ones)")
    parser.add_argument("--shape", nargs=3, type=int, default=(96, 128, 112), help="synthetic images' z y x")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--workdir", type=Path, help="where the files go (default: a temporary folder)")
    parser.add_argument("--results", help="append the table to this Markdown file")
    args = parser.parse_args(argv)

    import itk

    from mgr_engine import itk_io

    images = ({p.name: itk_io.read_image(p) for p in args.images} if args.images
              else synthetic_images(tuple(args.shape)))
    threads = itk_io.default_gzip_threads()  # what write_image uses
    deflates = [("zlib 1", (zlib, 1))]
    try:
        from isal import isal_zlib

        deflates.append(("ISA-L 2", (isal_zlib, 2)))
    except ImportError:
        print("isal is not installed: zlib only")

    rows = []
    with tempfile.TemporaryDirectory(dir=args.workdir) as work:
        work = Path(work)
        for name, image in images.items():
            theirs, itk_nii, nii = work / "itk.nii.gz", work / "itk.nii", work / "ours.nii"
            itk_time = timed(lambda: itk.imwrite(image, str(theirs)), args.repeats)
            expected, itk_size = gzip.decompress(theirs.read_bytes()), theirs.stat().st_size
            voxels = "x".join(map(str, itk.size(image)))
            rows.append(f"| {name} ({voxels}, {len(expected) / 2**20:.0f} MiB) | ITK, one core | "
                        f"{itk_time:.2f} s | {itk_size / 2**20:.1f} MiB | |")
            itk_nii_time = timed(lambda: itk_io._write_with_itk(image, itk_nii), args.repeats)
            rows.append(f"| | ITK, `.nii` (no compression) | {itk_nii_time:.2f} s | "
                        f"{itk_nii.stat().st_size / 2**20:.1f} MiB | |")
            nii_time = timed(lambda: itk_io._write_image_file(image, nii), args.repeats)
            assert nii.read_bytes() == expected, "not ITK's bytes"
            rows.append(f"| | `write_image`, `.nii` | {nii_time:.2f} s | {nii.stat().st_size / 2**20:.1f} MiB | |")
            nii.unlink()
            previous = work / "previous.nii.gz"
            gzip_time = timed(lambda: itk_io.gzip_file(itk_nii, previous, threads=threads), args.repeats)
            total = itk_nii_time + gzip_time
            rows.append(f"| | ITK's `.nii`, then `gzip_file` of it ({deflates[-1][0]}, {threads} threads; "
                        f"`write_image` before 2026-12-02) | {total:.2f} s | {previous.stat().st_size / 2**20:.1f} MiB | "
                        f"{itk_time / total:.1f}x |")
            previous.unlink()
            itk_nii.unlink()
            for label, deflate in deflates:
                for n in sorted({1, threads}):
                    ours = work / f"ours-{n}.nii.gz"
                    ours_time = timed(lambda: itk_io.gzip_file(itk_io._NiftiBytes.of(image), ours, threads=n,
                                                               deflate=deflate), args.repeats)
                    assert gzip.decompress(ours.read_bytes()) == expected, "not ITK's bytes"
                    rows.append(f"| | `gzip_file` of the `.nii`'s bytes, {label}, {n} thread{'s' * (n > 1)} | "
                                f"{ours_time:.2f} s | {ours.stat().st_size / 2**20:.1f} MiB "
                                f"({ours.stat().st_size / itk_size:.3f}x) | {itk_time / ours_time:.1f}x |")
                    ours.unlink()
                    print(f"{name}: ITK {itk_time:.2f} s, ours with {label} on {n} threads {ours_time:.2f} s", flush=True)
            theirs.unlink()

    header = (f"### `.nii.gz` outputs: ITK's writer against `write_image` ({platform.processor() or platform.machine()}, "
              f"gzip on {threads} threads by default, itk {itk.__version__})\n\n"
              "| image | written by | time | size (/ ITK's) | ITK / it |\n|---|---|---|---|---|\n")
    print_and_append(header + "\n".join(rows) + "\n", args.results)


if __name__ == "__main__":
    main()
