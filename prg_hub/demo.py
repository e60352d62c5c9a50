"""The PRG web demo: a Gradio app with three tabs over one PRG image classifier.

* **Classify**: an uploaded image, or one of `examples/images`, → the top-5 labels and probabilities that
  `pipeline("image-classification")` gives (softmax of the logits).
* **Trajectory**: the reversed ODE dx/dt = v_θ(x, t) from the image x_0 (t = 0) to x_{feature_t}, solved by the
  model's own solver with `num_steps` steps on the grid t_k = k·feature_t/num_steps: at most `MAX_FRAMES` of the
  states x_{t_k}, evenly chosen, side by side, and the labels the head reads off x_{feature_t} with these settings.
* **Generate**: ε ~ N(0, I) at t = 1 integrated to t = 0 (`PRGModel.generate`), with a seed and a step count.

`PRGDemo` does the work of each tab and needs no gradio; `build_demo` lays it out as a `gradio.Blocks` and
`launch` serves it, offline (no analytics, no share link, system fonts only). gradio is the optional extra
`pip install "prg_hub[demo]"`, imported by those two functions only. `prg-hub demo` and the Space entry point
`app.py` use them.

An upload the demo cannot use (not an image, a corrupt or empty file, more than `MAX_PIXELS` pixels) is a
`DemoInputError`, whose message the page shows in the tab's status line.
"""

import math
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers.utils import make_image_grid
from PIL import Image, ImageDraw, ImageFont
from transformers import pipeline

import prg_hub

from .image_files import IMAGE_EXTENSIONS, UnreadableImageError, open_image
from .image_grid import to_pil_images
from .loading import architecture_of, load_prg_config
from .modeling_prg import PRGForImageClassification
from .solvers import time_grid

# The example images of the repository (a source checkout or a Space); a wheel does not install them.
EXAMPLE_IMAGES = Path(__file__).resolve().parent.parent / "examples" / "images"
MAX_PIXELS = 40_000_000  # larger uploads are refused before they are decoded
MAX_UPLOAD_BYTES = 100 * 1024 * 1024  # gradio refuses larger files before they reach the demo
TOP_K = 5
MAX_FRAMES = 10  # states shown in the trajectory strip, whatever num_steps is
MAX_TRAJECTORY_STEPS = 1000  # the paper reports robustness from 20 to 1000 steps
MAX_GENERATION_STEPS = 200
MAX_GENERATED_IMAGES = 32
GRID_COLUMNS = 8
SHOWN_PIXELS = 96  # on-screen size of one image (nearest-neighbour upscaling of the model's resolution)
CAPTION_HEIGHT = 22  # pixels under each frame of the strip for its time t
PROGRESS_RESOLUTION = 0.01  # of the integration interval, between two progress reports
SYSTEM_FONTS = ["ui-sans-serif", "system-ui", "sans-serif"]
SYSTEM_MONO_FONTS = ["ui-monospace", "monospace"]
IMAGE_BUTTONS = ["download", "fullscreen"]  # not "share", which posts to the Hub

ProgressReport = Callable[[float], None]  # called with the fraction of the ODE integrated, in [0, 1]


class DemoInputError(ValueError):
    """An input the demo cannot use; the message is written for the page."""


class NotAClassifierError(ValueError):
    """The checkpoint has no classification head (a `PRGModel` or `PRGForFlowMatching` checkpoint)."""


def read_upload(path: str | Path) -> Image.Image:
    """The image at `path`, fully decoded in its stored mode (`open_image`), or a `DemoInputError` naming the file.

    Its size is read from the header first, so an image of more than `MAX_PIXELS` pixels is refused before any
    pixel is decoded, and so is one over PIL's decompression-bomb limit.
    """
    name = Path(path).name
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as header:
                width, height = header.size
    except Image.DecompressionBombError:
        width = height = math.inf
    except Exception:  # not an image PIL can identify: open_image says why
        width = height = 0
    if width * height > MAX_PIXELS:
        size = "" if math.isinf(width) else f" ({width}×{height} = {width * height / 1e6:.0f} megapixels)"
        raise DemoInputError(f"{name} is too large{size}: the demo takes images of at most "
                             f"{MAX_PIXELS // 1_000_000} megapixels. Downscale it and try again.")
    try:
        return open_image(Path(path))
    except UnreadableImageError as error:
        reason = error.reason.replace(str(path), name)
        raise DemoInputError(f"{name} is not an image the demo can read ({reason}).") from None


def frame_indices(num_steps: int, max_frames: int = MAX_FRAMES) -> list[int]:
    """Indices k of the states x_{t_k} to show: min(max_frames, num_steps + 1) of 0, …, num_steps, evenly
    spread, always the first (the image) and the last (x_{feature_t})."""
    count = min(max_frames, num_steps + 1)
    return sorted({round(i * num_steps / (count - 1)) for i in range(count)}) if count > 1 else [0]


def for_display(states: torch.Tensor) -> torch.Tensor:
    """States (N, C, H, W) scaled into [-1, 1] for display: each x divided by max(1, q), q the 99th percentile of
    its |x|. Images (|x| <= 1) are shown as they are; states near Gaussian noise (|x| reaching 3 or more) are
    compressed rather than clipped to black and white."""
    flat = states.detach().float().flatten(1).abs()
    scale = flat.quantile(0.99, dim=1).clamp(min=1.0)
    return states.float() / scale.view(-1, 1, 1, 1)


def enlarged(image: Image.Image, pixels: int = SHOWN_PIXELS) -> Image.Image:
    """`image` scaled by an integer factor to about `pixels` on its longer side, nearest neighbour (pixels stay
    sharp squares)."""
    factor = max(1, round(pixels / max(image.size)))
    return image.resize((image.width * factor, image.height * factor), Image.NEAREST)


def trajectory_strip(states: torch.Tensor, times: list[float]) -> Image.Image:
    """One image: the states (N, C, H, W) enlarged (`enlarged`) side by side, in display range (`for_display`),
    each captioned with its time t."""
    frames = [enlarged(frame) for frame in to_pil_images(for_display(states))]
    width, height = frames[0].size
    strip = Image.new("RGB", (width * len(frames), height + CAPTION_HEIGHT), "white")
    draw = ImageDraw.Draw(strip)
    font = ImageFont.load_default(size=CAPTION_HEIGHT - 8)
    for index, (frame, t) in enumerate(zip(frames, times, strict=True)):
        strip.paste(frame, (index * width, 0))
        draw.text((index * width + width / 2, height + CAPTION_HEIGHT / 2), f"t = {t:.3g}", fill="black",
                  font=font, anchor="mm")
    return strip


def image_grid(images: torch.Tensor, columns: int = GRID_COLUMNS) -> Image.Image:
    """Images (B, C, H, W) in [-1, 1] enlarged (`enlarged`) in rows of `columns`, the last row padded in white."""
    tiles = [enlarged(image) for image in to_pil_images(images)]
    columns = min(columns, len(tiles))
    rows = -(-len(tiles) // columns)
    tiles += [Image.new("RGB", tiles[0].size, "white")] * (rows * columns - len(tiles))
    return make_image_grid(tiles, rows=rows, cols=columns)


@contextmanager
def solver_progress(velocity: torch.nn.Module, t_start: float, t_end: float, report: ProgressReport | None
                    ) -> Iterator[None]:
    """Within the block, call `report((t - t_start) / (t_end - t_start))`, the fraction of the ODE integrated,
    whenever the solver evaluates the velocity network v(x, t) at a time t at least `PROGRESS_RESOLUTION` of the
    interval past the last one reported: whatever the solver, at most 1 / PROGRESS_RESOLUTION + 1 reports."""
    if report is None:
        yield
        return
    last_reported = -math.inf

    def before_evaluation(module, inputs):
        nonlocal last_reported
        fraction = (inputs[1].flatten()[0].item() - t_start) / (t_end - t_start)
        if fraction >= last_reported + PROGRESS_RESOLUTION - 1e-9:
            last_reported = fraction
            report(fraction)

    handle = velocity.register_forward_pre_hook(before_evaluation)
    try:
        yield
    finally:
        handle.remove()


@dataclass
class Trajectory:
    """The reversed ODE of one image at given settings, as the Trajectory tab shows it.

    strip: the shown states side by side (`trajectory_strip`); times: their times t; predictions: the top-5
    [{"label", "score"}] read off x_{feature_t}, exactly as the image-classification pipeline scores logits.
    """

    strip: Image.Image
    times: list[float]
    predictions: list[dict]


class PRGDemo:
    """The work behind each tab, on one `PRGForImageClassification` served by the image-classification pipeline.

    Args:
        model_id_or_path: a Hub repo id or a `save_pretrained` folder of a PRG classifier; default: the shipped
            CIFAR-10 model (`prg_hub.DEFAULT_MODEL`).
        device: where the model runs; default: the GPU when torch sees one.

    Raises `NotAClassifierError` for a checkpoint without a classification head, and what loading raises
    (OSError, ValueError, …) for a missing or broken one.
    """

    def __init__(self, model_id_or_path: str | None = None, device: str | None = None):
        self.model_id = model_id_or_path or prg_hub.DEFAULT_MODEL
        architecture = architecture_of(load_prg_config(self.model_id))
        if architecture is not PRGForImageClassification:
            raise NotAClassifierError(
                f"{self.model_id!r} is a {architecture.__name__} checkpoint: it has no classification head. The "
                "demo needs a PRGForImageClassification checkpoint."
            )
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.classifier = pipeline("image-classification", model=self.model_id, device=device)
        self.model: PRGForImageClassification = self.classifier.model.eval()
        self.config = self.model.config

    @property
    def top_k(self) -> int:
        return min(TOP_K, self.config.num_labels)

    def model_view(self, image: Image.Image) -> Image.Image:
        """The image as the model receives it (processed to `image_size`², in [-1, 1]), enlarged for display."""
        pixel_values = self.classifier.image_processor(image, return_tensors="pt")["pixel_values"]
        return enlarged(to_pil_images(pixel_values)[0], 4 * SHOWN_PIXELS)

    def classify(self, image: Image.Image) -> list[dict]:
        """The pipeline's top-5 predictions for `image`: [{"label", "score"}], scores descending."""
        return self.classifier(image, top_k=self.top_k)

    def trajectory(self, image: Image.Image, num_steps: int, feature_t: float,
                   report: ProgressReport | None = None) -> Trajectory:
        """Reverse the flow from `image` to `feature_t` in `num_steps` steps of the model's solver (the forward pass
        the pipeline runs, with these two values) and return the strip of states and the prediction.

        `report(fraction)` follows the integration from 0 (t = 0) to 1 (t = feature_t).
        """
        pixel_values = self.classifier.image_processor(image, return_tensors="pt")["pixel_values"]
        with torch.inference_mode(), solver_progress(self.model.prg.velocity, 0.0, feature_t, report):
            output = self.model(pixel_values.to(self.model.device, self.model.dtype), feature_t=feature_t,
                                num_steps=num_steps, output_hidden_states=True)
        shown = frame_indices(num_steps)
        grid = time_grid(0.0, feature_t, num_steps, dtype=torch.float64)
        times = [grid[k].item() for k in shown]
        states = torch.cat([output.hidden_states[k] for k in shown])
        predictions = self.classifier.postprocess({"logits": output.logits.float().cpu()}, top_k=self.top_k)
        return Trajectory(trajectory_strip(states, times), times, predictions)

    def generate(self, num_images: int, num_steps: int, seed: int,
                 report: ProgressReport | None = None) -> Image.Image:
        """`num_images` samples from noise (`PRGModel.generate`, `num_steps` steps of the model's solver from t = 1
        to t = 0, noise drawn from a generator seeded with `seed`), as one grid.

        `report(fraction)` follows the integration from 0 (t = 1) to 1 (t = 0).
        """
        generator = torch.Generator(device=self.model.device).manual_seed(seed)
        with solver_progress(self.model.prg.velocity, 1.0, 0.0, report):
            images = self.model.prg.generate(num_images, num_steps=num_steps, generator=generator)
        return image_grid(images)


def example_images(folder: Path = EXAMPLE_IMAGES) -> list[Path]:
    """The image files of `folder`, sorted; none when it does not exist."""
    if not folder.is_dir():
        return []
    return sorted(path for path in folder.iterdir() if path.suffix.lower() in IMAGE_EXTENSIONS)


def predictions_for_label(predictions: list[dict]) -> dict[str, float]:
    """[{"label", "score"}] as the {label: probability} that a `gradio.Label` shows."""
    return {prediction["label"]: prediction["score"] for prediction in predictions}


def build_demo(model_id_or_path: str | None = None, examples: Path = EXAMPLE_IMAGES):
    """The demo as a `gradio.Blocks`: the tabs Classify, Trajectory and Generate over `PRGDemo(model_id_or_path)`.

    The examples of `examples` are offered as a gallery, and the first one is chosen when the page opens. Every
    component a test needs has a stable `elem_id`. Serve it with `launch`.
    """
    import gradio as gr

    work = PRGDemo(model_id_or_path)
    config = work.config
    example_paths = example_images(examples)
    size = config.image_size

    def choose(path: str | None):
        """Read and classify the image at `path`: (chosen path, model view, labels, status)."""
        if path is None:
            return None, None, None, ""
        try:
            image = read_upload(path)
        except DemoInputError as error:
            return None, None, None, f"**Cannot use this file.** {error}"
        predictions = work.classify(image)
        top = predictions[0]
        status = f"{Path(path).name}: **{top['label']}** ({top['score']:.1%})"
        return path, work.model_view(image), predictions_for_label(predictions), status

    def choose_example(selection: gr.SelectData):
        return choose(str(example_paths[selection.index]))

    def show_trajectory(path, num_steps, feature_t, progress=gr.Progress()):
        if path is None:
            return None, None, "Choose an image in the Classify tab first."
        result = work.trajectory(read_upload(path), int(num_steps), float(feature_t),
                                 report=lambda fraction: progress(fraction, desc="Reversing the ODE"))
        top = result.predictions[0]
        times = ", ".join(f"{t:.3g}" for t in result.times)
        status = (f"{int(num_steps)} {config.solver} steps to feature_t = {feature_t:g}: **{top['label']}** "
                  f"({top['score']:.1%}). Shown: t = {times}.")
        return result.strip, predictions_for_label(result.predictions), status

    def generate(num_images, num_steps, seed, progress=gr.Progress()):
        grid = work.generate(int(num_images), int(num_steps), int(seed),
                             report=lambda fraction: progress(fraction, desc="Integrating from noise"))
        return grid, f"{int(num_images)} samples, {int(num_steps)} {config.solver} steps, seed {int(seed)}."

    with gr.Blocks(title="PRG: Pretrained Reversible Generation", analytics_enabled=False) as demo:
        gr.Markdown(
            "# PRG: Pretrained Reversible Generation\n"
            f"A flow-matching velocity network run backwards, from the image (t = 0) towards noise, with a head that "
            f"reads the state at `feature_t`. Model: `{Path(work.model_id).name}`, {size}×{size} images, "
            f"{config.num_steps} {config.solver} steps to feature_t = {config.feature_t:g}."
        )
        chosen_path = gr.State(None)
        with gr.Tabs():
            with gr.Tab("Classify", elem_id="tab-classify"):
                with gr.Row():
                    with gr.Column():
                        upload = gr.File(label="Upload an image", file_types=["image"], type="filepath",
                                         height=150, elem_id="classify-upload")
                        gallery = gr.Gallery([str(path) for path in example_paths], label="…or pick an example",
                                             columns=4, height=270, allow_preview=False, elem_id="examples",
                                             visible=bool(example_paths))
                    with gr.Column():
                        model_view = gr.Image(label=f"What the model sees ({size}×{size}, enlarged)", format="png",
                                              interactive=False, height=200, buttons=IMAGE_BUTTONS,
                                              elem_id="classify-image")
                        labels = gr.Label(num_top_classes=work.top_k, label=f"Top-{work.top_k}",
                                          elem_id="classify-labels")
                        classify_status = gr.Markdown(elem_id="classify-status")
            with gr.Tab("Trajectory", elem_id="tab-trajectory"):
                gr.Markdown(
                    "The image chosen in the Classify tab carried by the reversed ODE from t = 0 to `feature_t`, "
                    f"at most {MAX_FRAMES} of its states, each rescaled to the display range (the states head "
                    "towards Gaussian noise). The labels are those the head reads at the end, with these settings: "
                    "PRG is robust to the number of steps (the paper reports 20 to 1000)."
                )
                with gr.Row():
                    num_steps = gr.Slider(1, MAX_TRAJECTORY_STEPS, value=config.num_steps, step=1,
                                          label="num_steps", elem_id="trajectory-steps")
                    feature_t = gr.Slider(0.05, 1.0, value=config.feature_t, step=0.05, label="feature_t",
                                          elem_id="trajectory-feature-t")
                strip = gr.Image(label="x_t from t = 0 to feature_t", format="png", interactive=False,
                                 show_label=False, buttons=IMAGE_BUTTONS, elem_id="trajectory-strip")
                with gr.Row():
                    trajectory_labels = gr.Label(num_top_classes=work.top_k, label="Prediction at these settings",
                                                 elem_id="trajectory-labels")
                    trajectory_status = gr.Markdown(elem_id="trajectory-status")
            with gr.Tab("Generate", elem_id="tab-generate"):
                gr.Markdown(
                    "Noise at t = 1 integrated to t = 0 by the same velocity network. A classifier's network was "
                    "finetuned for classification, so its samples are poor; a pretrained flow samples better."
                )
                with gr.Row():
                    num_images = gr.Slider(1, MAX_GENERATED_IMAGES, value=16, step=1, label="images",
                                           elem_id="generate-count")
                    generation_steps = gr.Slider(1, MAX_GENERATION_STEPS, value=20, step=1, label="num_steps",
                                                 elem_id="generate-steps")
                    seed = gr.Number(0, precision=0, label="seed", elem_id="generate-seed")
                generate_button = gr.Button("Generate", variant="primary", elem_id="generate-button")
                samples = gr.Image(label="Samples", format="png", interactive=False, buttons=IMAGE_BUTTONS,
                                   elem_id="generate-samples")
                generate_status = gr.Markdown(elem_id="generate-status")

        chosen = [chosen_path, model_view, labels, classify_status]
        trajectory_inputs = [chosen_path, num_steps, feature_t]
        trajectory_outputs = [strip, trajectory_labels, trajectory_status]
        upload.upload(choose, upload, chosen).then(show_trajectory, trajectory_inputs, trajectory_outputs)
        gallery.select(choose_example, None, chosen).then(show_trajectory, trajectory_inputs, trajectory_outputs)
        for slider in (num_steps, feature_t):
            slider.release(show_trajectory, trajectory_inputs, trajectory_outputs)
        generate_button.click(generate, [num_images, generation_steps, seed], [samples, generate_status])
        if example_paths:
            demo.load(lambda: choose(str(example_paths[0])), None, chosen).then(
                show_trajectory, trajectory_inputs, trajectory_outputs)
    return demo


def launch(demo, server_name: str | None = None, server_port: int | None = None) -> None:
    """Serve `demo` until interrupted, offline: no share link, no analytics, system fonts, uploads up to
    `MAX_UPLOAD_BYTES`, and any other error's message shown in the page.

    `server_name` and `server_port` default to gradio's (the `GRADIO_SERVER_NAME` and `GRADIO_SERVER_PORT`
    environment variables that a Space sets, else 127.0.0.1:7860).
    """
    import gradio as gr

    theme = gr.themes.Default(font=SYSTEM_FONTS, font_mono=SYSTEM_MONO_FONTS)
    demo.queue(default_concurrency_limit=1).launch(
        server_name=server_name, server_port=server_port, share=False, show_error=True, theme=theme,
        max_file_size=MAX_UPLOAD_BYTES,
    )
