"""Fetch transformers' own common test mixins for the installed transformers version.

`ModelTesterMixin`, `ConfigTester` and `ImageProcessingTestMixin` live in transformers' `tests/` folder, which the wheel
does not ship; the source distribution does (its top-level `tests/*.py`). This script downloads that sdist with pip
(package registry only), extracts `tests/*.py` into `build/transformers-tests/transformers_tests/` (an ignored
folder, never committed) and writes small stand-ins for the few files the sdist lacks. `make test` runs it before
pytest; `tests/test_transformers_common.py` then subclasses the mixins.

When the download is impossible (no registry), the reason is written to `UNAVAILABLE` in the target folder and the
script exits 0: the common tests then skip, quoting it. A later run tries again.

    python tests/fetch_transformers_tests.py [target_dir]
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
from importlib.metadata import version
from pathlib import Path

DEFAULT_TARGET = Path(__file__).resolve().parents[1] / "build" / "transformers-tests"
PACKAGE = "transformers_tests"  # the package name the mixins are imported under (they use relative imports)

# Files the mixins import that are not in the sdist. Each stand-in says what it replaces.
STAND_INS = {
    f"{PACKAGE}/generation/test_utils.py": '''"""Stand-in for transformers' tests/generation/test_utils.py (not in the sdist).

`ModelTesterMixin` only checks `issubclass(tester, GenerationTesterMixin)`; none of our models generates text.
"""


class GenerationTesterMixin:
    pass
''',
    f"{PACKAGE}/exporters/test_export.py": '''"""Stand-in for transformers' tests/exporters/test_export.py (not in the sdist).

`ExportTesterMixin` holds only @slow torch.export tests, which never run in this suite.
"""


class ExportTesterMixin:
    pass
''',
    f"{PACKAGE}/utils/test_configuration_utils.py": '''"""Stand-in for transformers' tests/utils/test_configuration_utils.py (not in the sdist).

`ConfigTester.check_config_arguments_init` builds a config from `config_common_kwargs` (common `PreTrainedConfig`
arguments with non-default values) and checks that each one is kept.
"""

config_common_kwargs = {
    "return_dict": False,
    "output_hidden_states": True,
    "output_attentions": True,
    "dtype": "float16",
    "chunk_size_feed_forward": 5,
    "architectures": ["BertModel"],
    "id2label": {0: "label"},
    "label2id": {"label": "0"},
    "problem_type": "regression",
}
''',
    "utils/fetch_hub_objects_for_ci.py": '''"""Stand-in for transformers' utils/fetch_hub_objects_for_ci.py (not in the sdist).

The image-processing mixin maps fixture URLs to a local cache with it; our testers never load those fixtures, so the
URL is returned unchanged.
"""


def url_to_local_path(url, *args, **kwargs):
    return url
''',
}


def installed_version() -> str:
    return version("transformers")


def is_complete(target: Path, wanted: str) -> bool:
    stamp = target / "COMPLETE"
    return stamp.exists() and stamp.read_text().strip() == wanted


def download_sdist(wanted: str, into: Path) -> Path:
    command = [
        sys.executable, "-m", "pip", "download", f"transformers=={wanted}",
        "--no-deps", "--no-binary", ":all:", "--quiet", "--dest", str(into),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise RuntimeError(f"`pip download transformers=={wanted}` failed: {result.stderr.strip()[-400:]}")
    archives = sorted(into.glob("transformers-*.tar.gz"))
    if not archives:
        raise RuntimeError(f"`pip download transformers=={wanted}` wrote no source archive into {into}")
    return archives[0]


def extract_tests(archive: Path, target: Path) -> int:
    """Copies the sdist's top-level `tests/*.py` into `target/PACKAGE`; returns how many."""
    package = target / PACKAGE
    count = 0
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            parts = Path(member.name).parts
            # transformers-X/tests/<file>.py, top level only
            if len(parts) == 3 and parts[1] == "tests" and parts[2].endswith(".py") and member.isfile():
                source = tar.extractfile(member)
                assert source is not None
                (package / parts[2]).write_bytes(source.read())
                count += 1
    return count


def write_layout(target: Path) -> None:
    for relative, text in STAND_INS.items():
        path = target / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for folder in (target / PACKAGE, target / PACKAGE / "generation", target / PACKAGE / "exporters"):
        (folder / "__init__.py").touch()
    (target / PACKAGE / "utils" / "__init__.py").touch()
    # test_pipeline_mixin reads `<repo>/tests/utils/tiny_model_summary.json` at import (we run no pipeline mixin).
    summary = target / "tests" / "utils" / "tiny_model_summary.json"
    summary.parent.mkdir(parents=True, exist_ok=True)
    summary.write_text(json.dumps({}))


def fetch(target: Path) -> str:
    wanted = installed_version()
    if is_complete(target, wanted):
        return f"transformers {wanted} common tests already in {target}"
    if target.exists():
        shutil.rmtree(target)
    (target / PACKAGE).mkdir(parents=True)
    try:
        with tempfile.TemporaryDirectory() as scratch:
            archive = download_sdist(wanted, Path(scratch))
            count = extract_tests(archive, target)
    except (RuntimeError, OSError, subprocess.SubprocessError, tarfile.TarError) as error:
        (target / "UNAVAILABLE").write_text(f"transformers {wanted}'s test mixins could not be fetched: {error}\n")
        return f"common tests unavailable (they will skip): {error}"
    if count == 0 or not (target / PACKAGE / "test_modeling_common.py").exists():
        (target / "UNAVAILABLE").write_text(
            f"the transformers {wanted} sdist holds no tests/test_modeling_common.py\n"
        )
        return "common tests unavailable: the sdist has no test_modeling_common.py"
    write_layout(target)
    (target / "COMPLETE").write_text(wanted)
    return f"fetched {count} test modules of transformers {wanted} into {target}"


if __name__ == "__main__":
    print(fetch(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_TARGET))
