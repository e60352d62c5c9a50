"""Remote code: every PRG checkpoint also loads through transformers alone, without prg_hub installed.

transformers' remote-code path (`trust_remote_code=True`) reads `auto_map` in `config.json` and
`preprocessor_config.json`, fetches the modules it names from the checkpoint's folder or repo (with the modules
they import relatively), and imports them. So every checkpoint that prg_hub saves or pushes holds, beside its
weights:
* in `config.json`: `auto_map` (`AutoConfig`, `AutoModel`, `AutoModelForImageClassification`,
  `AutoModelForPreTraining`) and `custom_pipelines` (PRG's `image-classification` and `image-feature-extraction`
  pipelines, which take `feature_t`, `num_steps` and `return_blocks`); both written by `PRGConfig`;
* in `preprocessor_config.json`: `auto_map` (`AutoImageProcessor`), written by the image processor;
* the package modules those names need (`remote_code_files()`: the entry modules and every module they import
  relatively, transitively: the heads and the block reading among them), copied flat.

    AutoModelForImageClassification.from_pretrained("org/prg-c10", trust_remote_code=True)
    pipeline("image-feature-extraction", model="org/prg-c10", trust_remote_code=True)(img, feature_t=0.5)

Those modules import torch, transformers, diffusers, huggingface_hub, safetensors, torchdiffeq, scipy, numpy and
PIL, which transformers asks the user to install when one is missing. With prg_hub installed and imported, its
registered classes and pipelines serve the same checkpoints without `trust_remote_code`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from transformers.dynamic_module_utils import get_relative_import_files

from .configuration_prg import AUTO_MAP, CUSTOM_PIPELINES

PACKAGE_DIR = Path(__file__).parent
# `preprocessor_config.json`'s entry: transformers picks the class of the backend it loads with.
IMAGE_PROCESSOR_AUTO_MAP = {
    "AutoImageProcessor": {"torchvision": "image_processing_prg.PRGImageProcessor",
                           "pil": "image_processing_prg.PRGImageProcessorPil"},
}
# The modules that `auto_map` and `custom_pipelines` name; the files they import relatively come with them.
ENTRY_MODULES = ("configuration_prg", "modeling_prg", "image_processing_prg", "pipelines")


def remote_code_files() -> list[Path]:
    """The package files a checkpoint carries: the entry modules and, recursively, what they import relatively."""
    files = set()
    for name in ENTRY_MODULES:
        entry = PACKAGE_DIR / f"{name}.py"
        files.add(entry)
        files.update(Path(path) for path in get_relative_import_files(entry))
    return sorted(files)


def write_remote_code(folder: str | Path) -> list[Path]:
    """Make the checkpoint in `folder` loadable through remote code; return the code files written.

    Copies `remote_code_files()` into it and adds the remote-code entries to its `config.json` (and to its
    `preprocessor_config.json`, when it has one) where they are missing, leaving every other entry as it is, so
    that a checkpoint saved by an earlier version gains them too.
    """
    folder = Path(folder)
    entries = {"config.json": {"auto_map": AUTO_MAP, "custom_pipelines": CUSTOM_PIPELINES},
               "preprocessor_config.json": {"auto_map": IMAGE_PROCESSOR_AUTO_MAP}}
    for name, wanted in entries.items():
        path = folder / name
        if path.is_file():
            saved = json.loads(path.read_text(encoding="utf-8"))
            if any(saved.get(key) != value for key, value in wanted.items()):
                path.write_text(json.dumps({**saved, **wanted}, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    written = []
    for source in remote_code_files():
        target = folder / source.name
        shutil.copyfile(source, target)
        written.append(target)
    return written
