"""The `prg-hub` command: classify and embed images with PRG models, sample from them, push and inspect them.

    prg-hub classify IMAGES_OR_DIRS... [--model ID_OR_DIR] [--top-k K] [--json] [--batch-size B] [SPEED]
    prg-hub extract IMAGES_OR_DIRS... --output FILE.safetensors|FILE.npy [--model ID_OR_DIR] [--feature-t T]
                    [--num-steps N] [--batch-size B] [SPEED]
    prg-hub generate --num-images N --output grid.png [--model ID_OR_DIR] [--num-steps N] [--seed S]
    prg-hub push DIR org/name [--revision BRANCH] [--private] [--commit-message MSG]
    prg-hub info [ID_OR_DIR]
    prg-hub demo [--model ID_OR_DIR] [--port N]
    prg-hub serve-hub --root DIR [--host 127.0.0.1] [--port 8000] [--token-file FILE] [--allow-anonymous-writes]
                      [--max-upload-bytes N] [--max-threads N]

ID_OR_DIR is a Hub repo id ("org/name") or a folder saved with `save_pretrained`; without one, the CIFAR-10
classifier installed with the package (`prg_hub.DEFAULT_MODEL`) is used, offline. Images: a file named on the
command line is read whatever its extension; a directory expands, recursively and in sorted order, to the files
in it with an image extension (`image_files.IMAGE_EXTENSIONS`). A file that cannot be read is reported on stderr as
`PATH: cannot read image (REASON)` and skipped; the others are still processed. Batches of more than one
`--batch-size` show a progress bar on stderr. The model runs on the GPU when torch sees one.

SPEED, the options of `PRGPreTrainedModel.enable_fast_inference` for classify and extract:
`--dtype {float32,bfloat16,float16}` (the velocity network's weights; default float32), `--compile`
(torch.compile the network; the first batch pays for the compilation) and `--channels-last` (channels-last
weights, faster convolutions on GPUs). The ODE state stays float32 and the scores and features are float32.

Exit status: 0 when everything succeeded; 1 when an input, the model or an upload failed (the other inputs are
still processed); 2 when the command line is wrong (argparse errors, an unsupported output type, a model of the
wrong kind for the command).
"""

from __future__ import annotations

import argparse
import json
import pickle
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import save_file
from tqdm import tqdm
from transformers.utils import cached_file

import prg_hub

from .checks import check_feature_t, check_num_steps
from .finiteness import NonFiniteError
from .hub_server import DEFAULT_MAX_THREADS, DEFAULT_MAX_UPLOAD_BYTES, run_hub_server
from .image_files import IMAGE_EXTENSIONS, UnreadableImageError, open_image
from .image_grid import save_image_grid
from .image_processing_prg import PRGImageProcessor, default_image_processor, default_image_processor_class
from .loading import architecture_of, count_parameters, load_prg_config
from .model_card import PIPELINE_TAGS, load_model_card
from .modeling_prg import PRGForImageClassification, PRGModel
from .run_records import push_training_output

DTYPE_CHOICES = ("float32", "bfloat16", "float16")
FEATURE_FORMATS = (".safetensors", ".npy")
PREPROCESSOR_FILE = "preprocessor_config.json"
# What loading a checkpoint raises for a missing, unreachable or corrupt one: OSError (missing files, Hub and
# HTTP errors), ValueError (not a PRG config, bad values, non-finite weights), SafetensorError (a truncated or
# corrupt weight file), UnpicklingError (a pytorch_model.bin holding more than tensors).
LOAD_ERRORS = (OSError, ValueError, SafetensorError, pickle.UnpicklingError)
EXIT_FAILED = 1
MAX_LABELS_SHOWN = 10


class CommandFailed(Exception):
    """A failure that stops the command: reported as `prg-hub: MESSAGE` with exit status 1."""


@contextmanager
def reported_as_failure(*error_types: type[Exception]):
    """Turn `error_types` raised inside the block into `CommandFailed` with the error's message."""
    try:
        yield
    except error_types as error:
        raise CommandFailed(str(error)) from error


class InputErrors:
    """Reports inputs that could not be processed on stderr (`PATH: REASON`) and counts them."""

    def __init__(self):
        self.count = 0

    def report(self, path: str, reason: str) -> None:
        self.count += 1
        tqdm.write(f"{path}: {reason}", file=sys.stderr)


def expand_image_paths(inputs: list[str], errors: InputErrors) -> list[str]:
    """Files as given; directories expanded recursively to their image files, sorted. Missing paths are reported."""
    paths = []
    for name in inputs:
        path = Path(name)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
            if not found:
                extensions = ", ".join(sorted(IMAGE_EXTENSIONS))
                errors.report(name, f"no image files in this directory (extensions: {extensions})")
            paths.extend(str(p) for p in found)
        elif path.is_file():
            paths.append(name)
        else:
            errors.report(name, "no such file or directory")
    return paths


def read_image(path: str, processor: PRGImageProcessor) -> torch.Tensor:
    """Decode one image file completely (`open_image`, which raises `UnreadableImageError` naming it) and
    preprocess it as the pipelines do: pixel values of shape (3, H, W) in [-1, 1]."""
    return processor(images=open_image(Path(path)), return_tensors="pt")["pixel_values"][0]


def image_batches(
    paths: list[str], processor: PRGImageProcessor, batch_size: int, errors: InputErrors
) -> Iterator[tuple[list[str], torch.Tensor]]:
    """Yield (paths, pixel values (B, 3, H, W)) for up to `batch_size` files at a time, skipping unreadable ones."""
    with tqdm(total=len(paths), unit="image", file=sys.stderr, disable=len(paths) <= batch_size) as progress:
        for start in range(0, len(paths), batch_size):
            batch_paths, pixel_values = [], []
            for path in paths[start:start + batch_size]:
                try:
                    pixel_values.append(read_image(path, processor))
                    batch_paths.append(path)
                except Exception as error:  # any decoder or conversion failure of one file must not stop the rest
                    reason = error.reason if isinstance(error, UnreadableImageError) else error
                    errors.report(path, f"cannot read image ({reason})")
                progress.update()
            if pixel_values:
                yield batch_paths, torch.stack(pixel_values)


def load_model(args: argparse.Namespace, model_id: str, model_class: type):
    """Load `model_id` as `model_class` in eval mode (on the GPU when there is one), with its image processor.

    A checkpoint of the wrong kind for the command (a feature extractor asked to classify) is a usage error. A
    checkpoint without `preprocessor_config.json` gets the default processor for its image size; one whose
    `preprocessor_config.json` cannot be read is an error.
    """
    try:
        config = load_prg_config(model_id)
        if model_class is PRGForImageClassification and architecture_of(config) is not PRGForImageClassification:
            args.parser.error(
                f"{model_id!r} is a {architecture_of(config).__name__} checkpoint: it extracts features but has no "
                "classification head. Use `prg-hub extract`, or pass a PRGForImageClassification checkpoint."
            )
        model = model_class.from_pretrained(model_id, config=config)
        has_processor = cached_file(model_id, PREPROCESSOR_FILE, _raise_exceptions_for_missing_entries=False)
        processor = (default_image_processor_class().from_pretrained(model_id) if has_processor
                     else default_image_processor(config.image_size))
    except LOAD_ERRORS as error:
        raise CommandFailed(f"cannot load model {model_id!r}: {_describe(error)}") from error
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return model.to(device).eval(), processor


def apply_speed_options(model, args: argparse.Namespace) -> None:
    """Apply the command's speed options (`add_speed_options`) to the loaded model; a combination the model refuses
    (`--compile --channels-last` on the CPU) is a usage error."""
    try:
        model.enable_fast_inference(dtype=args.dtype, compile=args.compile, channels_last=args.channels_last)
    except ValueError as error:
        args.parser.error(f"--compile with --channels-last: {error}")


def _describe(error: Exception) -> str:
    """An exception as one line; corrupt weight files are named as such."""
    message = " ".join(str(error).split()) or type(error).__name__
    if isinstance(error, SafetensorError):
        return f"a weight file is truncated or corrupt ({message}); download or save it again"
    if isinstance(error, pickle.UnpicklingError):  # torch.load(weights_only=True) met more than tensors
        return ("its pickled weights (pytorch_model.bin) hold objects other than tensors, which could run code, so "
                "they were not loaded; use a checkpoint saved as safetensors")
    return message


def check_output_writable(output: Path) -> None:
    """Fail before any work if `output` cannot be created: its folder is missing and cannot be made, or is not
    writable, or `output` is a directory."""
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        if output.is_dir():
            raise IsADirectoryError(f"{output} is a directory")
        existed = output.exists()
        with open(output, "ab"):  # appends nothing: only proves the file can be written
            pass
        if not existed:
            output.unlink()
    except OSError as error:
        raise CommandFailed(f"cannot write {str(output)!r}: {error.strerror or error}.") from error


def classify(args: argparse.Namespace) -> int:
    """Print the top-k labels of each image: `PATH: LABEL (SCORE), ...`, or one JSON record per line.

    A model that produces NaN or Inf logits stops the command (exit status 1) rather than print them."""
    if args.top_k < 1:
        args.parser.error(f"--top-k must be >= 1, got {args.top_k}.")
    model_id = args.model
    model, processor = load_model(args, model_id, PRGForImageClassification)
    apply_speed_options(model, args)
    errors = InputErrors()
    paths = expand_image_paths(args.images, errors)
    top_k = min(args.top_k, model.config.num_labels)
    with torch.inference_mode(), reported_as_failure(NonFiniteError):
        for batch_paths, pixel_values in image_batches(paths, processor, args.batch_size, errors):
            probabilities = model(pixel_values.to(model.device)).logits.float().softmax(dim=-1)
            scores, indices = probabilities.topk(top_k, dim=-1)
            for path, image_scores, image_indices in zip(batch_paths, scores.tolist(), indices.tolist(), strict=True):
                predictions = [{"label": model.config.id2label[index], "score": score}
                               for score, index in zip(image_scores, image_indices, strict=True)]
                if args.json:
                    print(json.dumps({"path": path, "predictions": predictions}), flush=True)
                else:
                    labels = ", ".join(f"{p['label']} ({p['score']:.3f})" for p in predictions)
                    print(f"{path}: {labels}", flush=True)
    return EXIT_FAILED if errors.count else 0


def extract(args: argparse.Namespace) -> int:
    """Write the pooled PRG features of the images, shape (N, C·head_pool_size²), row i for the i-th readable file.

    `.safetensors`: tensor "features" plus metadata "paths" (a JSON list of the N files, in row order), "model",
    "feature_t" and "num_steps". `.npy`: the array alone, and the file list beside it in `<stem>.paths.json`.
    """
    output = Path(args.output)
    if output.suffix not in FEATURE_FORMATS:
        args.parser.error(f"--output must end in {' or '.join(FEATURE_FORMATS)}, got {args.output!r}.")
    for check, value in ((check_feature_t, args.feature_t), (check_num_steps, args.num_steps)):
        if value is not None:
            try:
                check(value)
            except ValueError as error:
                args.parser.error(str(error))
    model_id = args.model
    check_output_writable(output)
    model, processor = load_model(args, model_id, PRGModel)
    apply_speed_options(model, args)
    errors = InputErrors()
    paths = expand_image_paths(args.images, errors)
    feature_t = model.config.feature_t if args.feature_t is None else args.feature_t
    num_steps = model.config.num_steps if args.num_steps is None else args.num_steps
    extracted_paths, features = [], []
    with torch.inference_mode(), reported_as_failure(NonFiniteError):
        for batch_paths, pixel_values in image_batches(paths, processor, args.batch_size, errors):
            output_features = model(pixel_values.to(model.device), feature_t=feature_t, num_steps=num_steps)
            features.append(output_features.pooler_output.float().cpu())
            extracted_paths.extend(batch_paths)
    if not features:
        raise CommandFailed(f"no image could be read; {output} was not written.")
    feature_matrix = torch.cat(features).contiguous()
    if output.suffix == ".safetensors":
        metadata = {"paths": json.dumps(extracted_paths), "model": model_id, "feature_t": str(feature_t),
                    "num_steps": str(num_steps)}
        save_file({"features": feature_matrix}, output, metadata=metadata)
    else:
        np.save(output, feature_matrix.numpy())
        output.with_suffix(".paths.json").write_text(json.dumps(extracted_paths) + "\n", encoding="utf-8")
    print(f"{output}: features of shape {tuple(feature_matrix.shape)} for {len(extracted_paths)} images")
    return EXIT_FAILED if errors.count else 0


def generate(args: argparse.Namespace) -> int:
    """Sample --num-images images from noise and save them as one grid image (as square as N allows)."""
    if args.num_images < 1:
        args.parser.error(f"--num-images must be >= 1, got {args.num_images}.")
    if args.num_steps is not None:
        try:
            check_num_steps(args.num_steps)
        except ValueError as error:
            args.parser.error(str(error))
    if Path(args.output).suffix.lower() not in Image.registered_extensions():
        args.parser.error(f"--output must be an image file name such as grid.png, got {args.output!r}.")
    check_output_writable(Path(args.output))
    model, _ = load_model(args, args.model, PRGModel)
    generator = torch.Generator(device=model.device).manual_seed(args.seed)
    images = model.generate(args.num_images, num_steps=args.num_steps, generator=generator)
    save_image_grid(images, args.output)
    print(f"{args.output}: {args.num_images} images of {model.config.image_size}×{model.config.image_size}")
    return 0


def push(args: argparse.Namespace) -> int:
    """Push a saved model folder (e.g. a training run's output_dir) with a card made from its run records."""
    if not (Path(args.folder) / "config.json").is_file():
        args.parser.error(f"{args.folder!r} is not a saved model folder: it has no config.json.")
    try:
        commit = push_training_output(args.folder, args.repo_id, revision=args.revision, private=args.private,
                                      commit_message=args.commit_message)
    except LOAD_ERRORS as error:
        raise CommandFailed(f"cannot push {args.folder!r} to {args.repo_id!r}: {_describe(error)}") from error
    print(f"pushed {args.folder} to {args.repo_id}: commit {commit.oid} ({commit.commit_url})")
    return 0


def info(args: argparse.Namespace) -> int:
    """Print the config summary, the parameter count and the evaluation results recorded in the model card."""
    try:
        config = load_prg_config(args.model)
        card = load_model_card(args.model)
    except LOAD_ERRORS as error:
        raise CommandFailed(f"cannot load model {args.model!r}: {_describe(error)}") from error
    architecture = architecture_of(config)
    lines = [
        f"model: {args.model}",
        f"class: {architecture.__name__} (pipeline tag {PIPELINE_TAGS[architecture.__name__]})",
        f"parameters: {count_parameters(config):,}",
        f"backbone: {config.backbone_type}",
        f"probability_path: {config.probability_path}",
        f"solver: {config.solver}, {config.num_steps} steps, feature_t {config.feature_t}",
        f"input: {config.image_size}×{config.image_size}, {config.num_channels} channels",
    ]
    if architecture is PRGForImageClassification:
        labels = [config.id2label[i] for i in range(config.num_labels)]
        shown = ", ".join(labels[:MAX_LABELS_SHOWN]) + (", ..." if len(labels) > MAX_LABELS_SHOWN else "")
        lines.append(f"labels: {config.num_labels} ({shown})")
    eval_results = card.data.eval_results if card is not None else None
    if eval_results:
        for result in eval_results:
            split = f", {result.dataset_split} split" if result.dataset_split else ""
            lines.append(f"metric: {result.metric_type} = {result.metric_value} on {result.dataset_name}{split}")
    else:
        lines.append("metrics: not evaluated (no model-index in the model card)" if card is not None
                     else "metrics: not evaluated (no model card)")
    print("\n".join(lines))
    return 0


def serve_hub(args: argparse.Namespace) -> int:
    """Serve a local Hub (prg_hub.hub_server) in the foreground until interrupted.

    A bad token file or option (ValueError, raised before serving) or a port that cannot be bound fails the command.
    """
    try:
        run_hub_server(args.root, args.host, args.port, token_file=args.token_file,
                       allow_anonymous_writes=args.allow_anonymous_writes, max_upload_bytes=args.max_upload_bytes,
                       max_threads=args.max_threads)
    except (ValueError, OSError) as err:
        raise CommandFailed(f"cannot serve the hub: {err}") from None
    return 0


def demo(args: argparse.Namespace) -> int:
    """Serve the web demo (`prg_hub.demo`: classify, the reversed trajectory, generation) on 127.0.0.1 until
    interrupted. gradio, the `demo` extra, is imported here only: without it this is a usage error."""
    from importlib import import_module

    try:
        import_module("gradio")
    except ImportError:
        args.parser.error('the demo needs gradio: pip install "prg_hub[demo]"')
    from .demo import NotAClassifierError, build_demo, launch

    try:
        app = build_demo(args.model)
    except NotAClassifierError as error:
        args.parser.error(str(error))
    except LOAD_ERRORS as error:
        raise CommandFailed(f"cannot load model {args.model!r}: {_describe(error)}") from error
    with reported_as_failure(OSError):  # the port is taken
        launch(app, server_name="127.0.0.1", server_port=args.port)
    return 0


def add_speed_options(sub: argparse.ArgumentParser) -> None:
    """The options of `PRGPreTrainedModel.enable_fast_inference`, for the commands that run the reversed ODE."""
    sub.add_argument("--dtype", choices=DTYPE_CHOICES, default="float32",
                     help="dtype of the velocity network's weights, in which it runs (default float32); the ODE "
                          "state, the scores and the features stay float32. bfloat16 or float16 are fast on GPUs.")
    sub.add_argument("--compile", action="store_true",
                     help="torch.compile the velocity network (the first batch waits for the compilation).")
    sub.add_argument("--channels-last", action="store_true",
                     help="Store the network's weights channels-last (faster convolutions on GPUs).")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prg-hub", description="Classify, embed and sample images with PRG models; push and inspect them."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, handler, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(handler=handler, parser=sub)
        return sub

    model_help = ("Hub repo id (org/name) or a folder saved with save_pretrained; default: the CIFAR-10 classifier "
                  "installed with prg_hub (prg_hub.DEFAULT_MODEL).")
    sub = command("classify", classify, "Print the top-k labels of each image.")
    sub.add_argument("images", nargs="+", metavar="IMAGES_OR_DIRS", help="Image files or directories of them.")
    sub.add_argument("--model", default=prg_hub.DEFAULT_MODEL,
                     help=f"A PRGForImageClassification checkpoint: {model_help}")
    sub.add_argument("--top-k", type=int, default=5, help="Labels per image (default 5, at most all labels).")
    sub.add_argument("--json", action="store_true", help='One JSON record per line: {"path", "predictions"}.')
    sub.add_argument("--batch-size", type=int, default=32, help="Images per forward pass (default 32).")
    add_speed_options(sub)

    sub = command("extract", extract, "Write pooled PRG features of the images, shape (N, C·p²).")
    sub.add_argument("images", nargs="+", metavar="IMAGES_OR_DIRS", help="Image files or directories of them.")
    sub.add_argument("--output", required=True, help="FILE.safetensors (with the file list) or FILE.npy.")
    sub.add_argument("--model", default=prg_hub.DEFAULT_MODEL, help=f"Any PRG checkpoint: {model_help}")
    sub.add_argument("--feature-t", type=float, help="Time in (0, 1] of x_t (1 is noise); the model's by default.")
    sub.add_argument("--num-steps", type=int, help="Solver steps from t = 0 to feature_t; the model's by default.")
    sub.add_argument("--batch-size", type=int, default=32, help="Images per forward pass (default 32).")
    add_speed_options(sub)

    sub = command("generate", generate, "Sample images from noise and save them as one grid.")
    sub.add_argument("--model", default=prg_hub.DEFAULT_MODEL,
                     help=f"Any PRG checkpoint: {model_help} That classifier's velocity network was finetuned "
                          "for classification, so its samples are poor; pass a pretrained flow for real samples.")
    sub.add_argument("--num-images", type=int, required=True)
    sub.add_argument("--output", required=True, help="The grid image, e.g. grid.png.")
    sub.add_argument("--num-steps", type=int, help="Solver steps from noise to data; the model's by default.")
    sub.add_argument("--seed", type=int, default=0, help="Seed of the noise (default 0).")

    sub = command("push", push, "Push a saved model folder to the Hub with a generated model card.")
    sub.add_argument("folder", metavar="DIR", help="A save_pretrained folder, e.g. a training run's output_dir.")
    sub.add_argument("repo_id", metavar="org/name")
    sub.add_argument("--revision", help="Branch to push to (created if needed); main by default.")
    sub.add_argument("--private", action="store_true", help="Create the repo as private.")
    sub.add_argument("--commit-message")

    sub = command("info", info, "Print a model's config summary, parameter count and card metrics.")
    sub.add_argument("model", metavar="ID_OR_DIR", nargs="?", default=prg_hub.DEFAULT_MODEL, help=model_help)

    sub = command("demo", demo, "Serve the web demo (classify, trajectory, generate) on 127.0.0.1; needs the "
                                "demo extra: pip install \"prg_hub[demo]\".")
    sub.add_argument("--model", default=prg_hub.DEFAULT_MODEL,
                     help=f"A PRGForImageClassification checkpoint: {model_help}")
    sub.add_argument("--port", type=int, default=7860, help="Port on 127.0.0.1 (default 7860).")

    sub = command("serve-hub", serve_hub, "Serve a local Hugging Face Hub (set HF_ENDPOINT to its URL).")
    sub.add_argument("--root", required=True, help="Folder holding the hub's repos (created if needed).")
    sub.add_argument("--host", default="127.0.0.1")
    sub.add_argument("--port", type=int, default=8000)
    sub.add_argument("--token-file", help="Lines 'TOKEN NAME ROLE' (roles read, write, admin); without it every "
                                          "write is refused.")
    sub.add_argument("--allow-anonymous-writes", action="store_true",
                     help="Let requests without a token write (local tests only: refused unless --host is loopback).")
    sub.add_argument("--max-upload-bytes", type=int, default=DEFAULT_MAX_UPLOAD_BYTES,
                     help=f"Largest LFS file accepted (default {DEFAULT_MAX_UPLOAD_BYTES}).")
    sub.add_argument("--max-threads", type=int, default=DEFAULT_MAX_THREADS,
                     help=f"Requests served at once (default {DEFAULT_MAX_THREADS}).")

    return parser


def main(argv: list[str] | None = None) -> int:
    """Run `prg-hub` with `argv` (default: the command line) and return the exit status."""
    args = build_parser().parse_args(argv)
    if getattr(args, "batch_size", 1) < 1:
        args.parser.error(f"--batch-size must be >= 1, got {args.batch_size}.")
    try:
        return args.handler(args)
    except CommandFailed as failure:
        print(f"prg-hub: {failure}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
