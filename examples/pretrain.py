"""Flow-matching pretraining of a PRG velocity network, with Accelerate.

    accelerate launch examples/pretrain.py --dataset uoft-cs/cifar10 --probability_path otcfm --backbone unet2d \
        --preset paper --image_size 32 --train_batch_size 128 --num_train_epochs 2000 --output_dir runs/otcfm-c10

Objective (`PRGForFlowMatching`): for images x (B, 3, H, W) in [-1, 1], noise ε ~ N(0, I) and t ~ U[0, 1],
    L_FM = mean over all elements of (v_θ(α_t·x + σ_t·ε, t) − (α'_t·x + σ'_t·ε))²
with (α, σ) and the coupling of (x, ε) given by --probability_path (gvp, icfm, otcfm; see prg_hub/paths.py).

One optimizer step sees train_batch_size · num_processes · gradient_accumulation_steps images; every process
draws its own batch, its own times t (the seed is offset by the process index) and its own noise ε (seeded by the
seed, the process index and the batch's place in the epoch, and paired with the batch one batch ahead in a worker
thread: prg_hub/noise_pairing.py), and Accelerate averages the gradients, so every process holds the same weights.
The final `metrics.json` records, per process, its mean loss and, with --record_batches, a SHA-256 of its weights
and of the sample indices it trained on.

Outputs in --output_dir: the model (`PRGForFlowMatching`, which `PRGModel.from_pretrained(output_dir)` and
`PRGForImageClassification.from_pretrained(output_dir)` load too; EMA weights when --use_ema),
`preprocessor_config.json`, `samples/step-<N>.png` grids, `checkpoints/checkpoint-<N>` (full training state),
`args.json` and `metrics.json`. The last line printed is a one-line summary.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.logging import get_logger
from accelerate.utils import gather_object, set_seed
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from prg_hub import PATHS, PRGConfig, PRGForFlowMatching, default_image_processor
from prg_hub.augment import AUGMENTATIONS, TrainAugmentation
from prg_hub.backbones import BACKBONES
from prg_hub.checkpointing import save_checkpoint
from prg_hub.data import load_image_dataset
from prg_hub.fast_step import add_fast_step_arguments, resolve_fast_step, speed_up
from prg_hub.finiteness import NonFiniteError, NonFiniteLossGuard
from prg_hub.image_grid import save_image_grid
from prg_hub.noise_pairing import NoisePairing
from prg_hub.presets import PRESETS, backbone_preset
from prg_hub.recipes import parse_args_with_recipe
from prg_hub.reproducibility import BatchRecord, parameters_sha256
from prg_hub.run_records import push_training_output, save_model, write_json
from prg_hub.training_data import DATALOADERS, get_train_dataloader
from prg_hub.training_loop import TrainingProgress

logger = get_logger(__name__)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Flow-matching pretraining of a PRG velocity network.")
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", required=True, help="Hub dataset id or local folder (parquet or imagefolder).")
    data.add_argument("--image_column", default=None, help="Image column; detected (img/image) when omitted.")
    data.add_argument("--train_split", default="train")
    data.add_argument("--max_train_samples", type=int, default=None, help="Use only the first N training images.")
    data.add_argument("--image_size", type=int, default=32)
    data.add_argument("--augmentation", choices=AUGMENTATIONS, default="flip")
    data.add_argument("--random_erasing", type=float, default=0.0,
                      help="Probability of random erasing after normalisation (released code: 0.25).")
    data.add_argument("--dataloader", choices=DATALOADERS, default="auto",
                      help="device: decode the split once onto the accelerator; stream: decode every image every "
                           "epoch, in workers; auto: device when the split fits (prg_hub/training_data.py). Either "
                           "way the batches are augmented on the accelerator.")
    data.add_argument("--dataloader_num_workers", type=int, default=0, help="Workers of the stream path.")
    data.add_argument("--cache_dir", default=None, help="datasets cache folder.")

    model = parser.add_argument_group("model")
    model.add_argument("--probability_path", choices=sorted(PATHS), default="otcfm",
                       help="Flow-matching probability path (prg_hub/paths.py).")
    model.add_argument("--backbone", choices=sorted(BACKBONES), default="unet2d")
    model.add_argument("--preset", choices=PRESETS, default="small", help="Network size (prg_hub/presets.py).")
    model.add_argument("--dropout", type=float, default=None,
                       help="Dropout of the network (default: the preset's; the released code: 0).")
    model.add_argument("--time_scale", type=float, default=1000.0,
                       help="The network sees the timestep time_scale · t, t in [0, 1] (released code: 1).")

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--train_batch_size", type=int, default=128, help="Per-process batch size.")
    optim.add_argument("--gradient_accumulation_steps", type=int, default=1)
    optim.add_argument("--num_train_epochs", type=int, default=100)
    optim.add_argument("--max_train_steps", type=int, default=None, help="Overrides --num_train_epochs.")
    optim.add_argument("--learning_rate", type=float, default=1e-4)
    optim.add_argument("--adam_beta1", type=float, default=0.9)
    optim.add_argument("--adam_beta2", type=float, default=0.999)
    optim.add_argument("--weight_decay", type=float, default=0.0)
    optim.add_argument("--lr_scheduler", default="constant_with_warmup", help="A diffusers.optimization schedule.")
    optim.add_argument("--lr_warmup_steps", type=int, default=0)
    optim.add_argument("--skip_nonfinite_steps", type=int, default=0,
                       help="Skip up to N optimizer steps whose loss is NaN or Inf (no update) before stopping.")
    optim.add_argument("--max_grad_norm", type=float, default=1.0, help="Gradient clipping; 0 disables it.")
    optim.add_argument("--use_ema", action="store_true", help="Keep an exponential moving average of the weights.")
    optim.add_argument("--ema_decay", type=float, default=0.9999)
    optim.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default=None,
                       help="Defaults to the accelerate config.")
    optim.add_argument("--seed", type=int, default=0)

    run = parser.add_argument_group("outputs")
    run.add_argument("--output_dir", required=True)
    run.add_argument("--checkpointing_steps", type=int, default=1000, help="Save the training state every N steps.")
    run.add_argument("--checkpoints_total_limit", type=int, default=None, help="Keep at most N checkpoints.")
    run.add_argument("--resume_from_checkpoint", default=None, help="'latest' or a checkpoint folder.")
    run.add_argument("--sample_every_steps", type=int, default=1000, help="Save a sample grid every N steps.")
    run.add_argument("--num_sample_images", type=int, default=16)
    run.add_argument("--sample_num_steps", type=int, default=20, help="Euler steps of the sampling ODE.")
    run.add_argument("--logging_steps", type=int, default=50, help="Average the reported loss over N steps.")
    run.add_argument("--report_to", default=None, help="Accelerate tracker, e.g. tensorboard or wandb.")
    run.add_argument("--record_batches", action="store_true",
                     help="Record SHA-256 digests of the samples every step trained on and of the weights in "
                          "metrics.json (one gather per optimizer step).")
    run.add_argument("--push_to_hub", action="store_true", help="Push the final model and its card to the Hub.")
    run.add_argument("--hub_model_id", default=None, help="The Hub repo to push to, e.g. org/name.")
    add_fast_step_arguments(parser)
    args = parse_args_with_recipe(parser, argv)
    if args.push_to_hub and not args.hub_model_id:
        parser.error("--push_to_hub needs --hub_model_id org/name.")
    for name in ("train_batch_size", "gradient_accumulation_steps", "checkpointing_steps", "sample_every_steps",
                 "logging_steps", "num_sample_images"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}.")
    if args.skip_nonfinite_steps < 0:
        parser.error(f"--skip_nonfinite_steps must be >= 0, got {args.skip_nonfinite_steps}.")
    if args.dropout is not None and not 0 <= args.dropout < 1:
        parser.error(f"--dropout is a probability in [0, 1), got {args.dropout}.")
    if not args.time_scale > 0:
        parser.error(f"--time_scale must be > 0, got {args.time_scale}.")
    return args


@torch.no_grad()
def save_samples(model: PRGForFlowMatching, ema: EMAModel | None, args, step: int) -> Path:
    """Generate a grid with a fixed generator (EMA weights when kept) and save it as samples/step-<step>.png."""
    parameters = list(model.parameters())
    if ema is not None:
        ema.store(parameters)
        ema.copy_to(parameters)
    generator = torch.Generator(device=model.device).manual_seed(args.seed)
    images = model.prg.generate(args.num_sample_images, num_steps=args.sample_num_steps, generator=generator)
    if ema is not None:
        ema.restore(parameters)
    path = Path(args.output_dir) / "samples" / f"step-{step}.png"
    save_image_grid(images, path)
    return path


def training_function(args: argparse.Namespace) -> None:
    """Data, model and optimizer through `accelerator.prepare`, the training loop, then the model and its records."""
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=args.report_to,
        project_dir=args.output_dir,
        step_scheduler_with_optimizer=False,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
    )
    logger.info(accelerator.state, main_process_only=False)
    resolve_fast_step(args, accelerator.device)  # --channels_last, --fused_optimizer: on for CUDA; --compile opt-in
    output_dir = Path(args.output_dir)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        write_json(output_dir / "args.json", vars(args))

    # Data: every process reads the dataset; the prepared data loader gives each its own shard of every batch of
    # uint8 images, the same batches whether they are kept on the device or streamed, and the augmentation turns
    # them into pixel values on the device, each sample keyed by (seed, epoch, index).
    image_data = load_image_dataset(
        args.dataset, image_column=args.image_column, require_labels=False, cache_dir=args.cache_dir
    )
    processor = default_image_processor(args.image_size)
    train_dataloader, data_path = get_train_dataloader(
        image_data, processor, accelerator.device, dataloader=args.dataloader, train_split=args.train_split,
        train_batch_size=args.train_batch_size, max_train_samples=args.max_train_samples, drop_last=True,
        labels=False, seed=args.seed, num_workers=args.dataloader_num_workers,
    )
    augmentation = TrainAugmentation(args.augmentation, processor, random_erasing=args.random_erasing, seed=args.seed)

    # Model: identical initialisation on every process; then a different noise stream per process.
    set_seed(args.seed)
    config = PRGConfig(
        backbone_type=args.backbone,
        backbone_config=backbone_preset(args.backbone, args.preset, args.image_size, dropout=args.dropout),
        probability_path=args.probability_path,
        time_scale=args.time_scale,
    )
    model = PRGForFlowMatching(config)
    speed_up(model.prg, args)
    initial_sha256 = parameters_sha256(model) if args.record_batches else None
    ema = EMAModel(model.parameters(), decay=args.ema_decay, foreach=True) if args.use_ema else None
    set_seed(args.seed, device_specific=True)

    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.weight_decay,
        fused=args.fused_optimizer,
    )
    model, optimizer, train_dataloader = accelerator.prepare(model, optimizer, train_dataloader)
    if len(train_dataloader) == 0:
        raise ValueError(
            f"The training split has {len(train_dataloader.dataset)} images, fewer than one global batch of "
            f"{args.train_batch_size * accelerator.num_processes}; lower --train_batch_size."
        )
    progress = TrainingProgress(
        len(train_dataloader), args.gradient_accumulation_steps, args.num_train_epochs, args.max_train_steps
    )
    lr_scheduler = get_scheduler(
        args.lr_scheduler, optimizer, num_warmup_steps=args.lr_warmup_steps,
        num_training_steps=progress.max_train_steps,
    )
    lr_scheduler = accelerator.prepare(lr_scheduler)
    if ema is not None:
        ema.to(accelerator.device)
    if args.report_to:
        accelerator.init_trackers("prg-pretrain", config={k: v for k, v in vars(args).items() if v is not None})

    unwrapped = accelerator.unwrap_model(model)
    global_batch = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    logger.info(
        f"{len(train_dataloader.dataset)} images ({data_path} data), "
        f"{unwrapped.num_parameters() / 1e6:.2f}M parameters, global batch {global_batch}, "
        f"{progress.steps_per_epoch} steps per epoch, {progress.max_train_steps} steps"
    )
    progress.resume(accelerator, output_dir, args.resume_from_checkpoint, ema=ema)

    progress_bar = tqdm(total=progress.max_train_steps, initial=progress.global_step, desc="pretrain",
                        disable=not accelerator.is_local_main_process)
    window_losses: list[torch.Tensor] = []  # losses of the micro-batches since the last report
    window_loss, local_loss_sum, local_batches = float("nan"), torch.zeros((), device=accelerator.device), 0
    batch_record = BatchRecord() if args.record_batches else None
    loss_guard = NonFiniteLossGuard(accelerator, optimizer, args.skip_nonfinite_steps)
    noise_pairing = NoisePairing(unwrapped.prg.probability_path, args.seed, accelerator.process_index)
    start_time = time.perf_counter()
    model.train()
    for epoch in progress.remaining_epochs():
        first_batch = progress.batches_trained_in_epoch  # > 0 in the epoch a run resumed in
        batches = augmentation.batches(progress.epoch_batches(accelerator, train_dataloader, epoch), epoch)
        # Each batch comes with its noise ε, drawn and paired (OT-CFM) in a worker while the previous batch trains.
        for batch in noise_pairing.batches(batches, epoch, first_batch):
            with accelerator.accumulate(model):
                loss = model(batch["pixel_values"], noise=batch["noise"]).loss
                accelerator.backward(loss)
                loss_guard.observe(loss)
                # On the last micro-batch of a step: update only if every loss of the step was finite (a fused
                # optimizer is told on the device and skips a non-finite step itself: no wait for the check).
                update = not accelerator.sync_gradients or loss_guard.should_step(progress.global_step + 1)
                if update:
                    if accelerator.sync_gradients and args.max_grad_norm > 0:
                        accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                    optimizer.step()
                optimizer.zero_grad()
            local_loss_sum += loss.detach()
            local_batches += 1
            window_losses.append(loss.detach())
            if batch_record is not None:
                batch_record.add_batch(batch["index"])
            if not accelerator.sync_gradients:
                continue

            # An optimizer step ended (a skipped non-finite one too: it still counts).
            lr_scheduler.step()
            if ema is not None and update:
                ema.step(unwrapped.parameters())
            if batch_record is not None:
                batch_record.end_step(accelerator)
            progress.global_step += 1
            progress_bar.update(1)
            if progress.global_step % args.logging_steps == 0 or progress.finished:
                loss_guard.raise_if_too_many_skipped(progress.global_step)
                window_loss = accelerator.reduce(torch.stack(window_losses).mean(), reduction="mean").item()
                window_losses = []
                progress_bar.set_postfix(fm_loss=f"{window_loss:.4f}")
                accelerator.log({"fm_loss": window_loss, "lr": lr_scheduler.get_last_lr()[0], "epoch": epoch},
                                step=progress.global_step)
            if progress.global_step % args.checkpointing_steps == 0:
                loss_guard.raise_if_too_many_skipped(progress.global_step)
                save_checkpoint(accelerator, model, output_dir, progress.global_step, args.checkpoints_total_limit,
                                ema=ema)
            if progress.global_step % args.sample_every_steps == 0 and accelerator.is_main_process:
                save_samples(unwrapped, ema, args, progress.global_step)
            if progress.finished:
                break
    progress_bar.close()
    loss_guard.raise_if_too_many_skipped(progress.global_step)
    train_seconds = time.perf_counter() - start_time

    # Every process reports its own view: identical weights although each trained on different samples and noise.
    process_record = {
        "process_index": accelerator.process_index,
        "num_batches": local_batches,
        "mean_fm_loss": local_loss_sum.item() / max(local_batches, 1),
    }
    if batch_record is not None:
        process_record.update(parameters_sha256=parameters_sha256(unwrapped),
                              sample_indices_sha256=batch_record.local_sha256)
    process_records = gather_object([process_record])
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if ema is not None:
            ema.copy_to(unwrapped.parameters())
        save_model(unwrapped, output_dir)
        grid = save_samples(unwrapped, None, args, progress.global_step)
        metrics = {
            "steps": progress.global_step,
            "epochs": progress.epochs_done,
            "final_fm_loss": window_loss,
            "weights": "ema" if ema is not None else "raw",
            "global_batch_size": global_batch,
            "num_processes": accelerator.num_processes,
            "num_parameters": unwrapped.num_parameters(),
            "train_seconds": train_seconds,
            "processes": process_records,
            "sample_grid": str(grid),
        }
        if batch_record is not None:
            metrics.update(initial_parameters_sha256=initial_sha256, global_batches_sha256=batch_record.global_sha256)
        write_json(output_dir / "metrics.json", metrics)
        if args.push_to_hub:
            commit = push_training_output(output_dir, args.hub_model_id)
            logger.info(f"Pushed {output_dir} to {commit.commit_url}")
        print(
            f"pretrain: steps={progress.global_step} final_fm_loss={window_loss:.4f} "
            f"probability_path={args.probability_path} backbone={args.backbone}-{args.preset} "
            f"weights={metrics['weights']} output_dir={output_dir}"
        )
    accelerator.wait_for_everyone()  # every process tears the process group down together
    accelerator.end_training()


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    training_function(args)


if __name__ == "__main__":
    try:
        main()
    except NonFiniteError as error:  # a diverged run: say where, without a traceback
        sys.exit(f"{Path(__file__).name}: {error}")
