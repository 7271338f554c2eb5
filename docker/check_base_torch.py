"""Does this image's torch satisfy what the given wheels require of torch (their METADATA), as installed?

NGC images ship torch pre-releases (e.g. 2.6.0a0); under PEP 440 2.6.0a0 < 2.6.0, so a requirement torch>=2.6.0 would
make pip replace the image's CUDA build with a PyPI wheel.  pip accepts an installed pre-release that is inside the
range (prereleases=True), and so does this check.  Exit code 1 names each unmet requirement.

    python check_base_torch.py WHEEL...
"""

import sys
import zipfile

import torch
from packaging.requirements import Requirement
from packaging.version import Version


def torch_requirements(wheel: str) -> list[Requirement]:
    with zipfile.ZipFile(wheel) as z:
        metadata = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        lines = z.read(metadata).decode().splitlines()
    reqs = [Requirement(line.split(":", 1)[1].strip()) for line in lines if line.startswith("Requires-Dist:")]
    return [r for r in reqs if r.name == "torch" and (r.marker is None or r.marker.evaluate({"extra": ""}))]


def main(wheels: list[str]) -> int:
    version = Version(torch.__version__)
    unmet = [f"{wheel.rsplit('/', 1)[-1]} needs {req}" for wheel in wheels for req in torch_requirements(wheel)
             if not req.specifier.contains(version, prereleases=True)]
    for line in unmet:
        print(f"the base image's torch {version} does not do: {line}; pick another BASE_IMAGE", file=sys.stderr)
    if not unmet:
        print(f"base torch {version} satisfies every torch requirement of {len(wheels)} wheel(s)")
    return 1 if unmet else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
