"""PRG finetuning: a classifier on x_t of the reversed flow, trained end to end through the ODE solver.

    accelerate launch examples/finetune.py --model_name_or_path runs/otcfm-c10 --dataset uoft-cs/cifar10 \
        --augmentation randaugment --train_batch_size 128 --num_train_epochs 200 --output_dir runs/prg-c10

Model: x_0 = image (B, 3, H, W) in [-1, 1]; x_t = ODESolve(v_θ, x_0, 0 → feature_t, num_steps); the PRG head
maps AvgPool16(x_t) (B, 768) to logits (B, num_labels). Any other head reads blocks of v_θ instead (--head_type
linear, attention, difformer or diffeed, with --feature_blocks and --feature_times; `prg_hub/heads.py`): the ODE is
solved from x_0 through the times and v_θ evaluated at each, so the gradient reaches the network both through the
blocks read and through the states:

    accelerate launch examples/finetune.py --head_type attention --feature_blocks up_blocks.0 --feature_times 0.25 \
        --num_steps 4 --model_name_or_path runs/otcfm-c10 --dataset uoft-cs/cifar10 --output_dir runs/attention-c10

Loss:
    L = CE(logits, y; label smoothing) + β · L_FM(x_0)          β = --fm_loss_weight
Optimiser: AdamW (default lr = 1.25e-4 · global batch / 512, as the official recipe), a linear warm-up from
--warmup_start_lr_ratio · lr, then a cosine decay to --min_lr_ratio · lr (prg_hub/lr_schedules.py). The gradient
flows through every solver step (exact backprop, optionally with per-step checkpointing) or through torchdiffeq's
adjoint (--adjoint; approximate).

Distributed: each process takes its shard of every global batch (per-process --train_batch_size) and Accelerate
averages the gradients, so N processes with batch b train exactly as one process with batch N·b.

Outputs in --output_dir: the final classifier, `best/` (highest top-1 on the evaluation split, evaluated after
every epoch and at the end of the run), `checkpoints/checkpoint-<N>` (with `trainer_state.json`: the evaluations
so far), `args.json`, `metrics.json` (per-epoch history). Both models load with
`PRGForImageClassification.from_pretrained` and `pipeline("image-classification", ...)`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.logging import get_logger
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from prg_hub import HEADS, PATHS, SOLVERS, PRGConfig, PRGForImageClassification, default_image_processor
from prg_hub.augment import AUGMENTATIONS, TrainAugmentation
from prg_hub.backbones import BACKBONES
from prg_hub.checkpointing import save_checkpoint
from prg_hub.data import get_dataloaders, load_image_dataset
from prg_hub.fast_step import add_fast_step_arguments, resolve_fast_step, speed_up
from prg_hub.finiteness import NonFiniteError, NonFiniteLossGuard, check_finite_weights
from prg_hub.lr_schedules import warmup_cosine_schedule
from prg_hub.presets import PRESETS, backbone_preset
from prg_hub.recipes import parse_args_with_recipe
from prg_hub.reproducibility import BatchRecord
from prg_hub.run_records import push_training_output, save_model, write_json
from prg_hub.training_data import DATALOADERS, get_train_dataloader
from prg_hub.training_loop import TrainingProgress

logger = get_logger(__name__)
TRAINER_STATE = "trainer_state.json"  # best top-1 and history, saved beside each checkpoint


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Finetune a PRG classifier through the reversed flow.")
    model = parser.add_argument_group("model")
    model.add_argument("--model_name_or_path", default=None, help="Pretrained flow: local folder or Hub id.")
    model.add_argument("--from_scratch", action="store_true",
                       help="No pretraining: a randomly initialised network (the architecture of "
                            "--model_name_or_path, or of --backbone/--preset/--probability_path when that is "
                            "omitted).")
    model.add_argument("--backbone", choices=sorted(BACKBONES), default="unet2d", help="With --from_scratch only.")
    model.add_argument("--preset", choices=PRESETS, default="small", help="With --from_scratch only.")
    model.add_argument("--probability_path", choices=sorted(PATHS), default="otcfm",
                       help="With --from_scratch only.")
    model.add_argument("--image_size", type=int, default=32, help="With --from_scratch only.")
    model.add_argument("--dropout", type=float, default=None,
                       help="With --from_scratch only: dropout of the network (default: the preset's or the "
                            "pretrained config's; the released code: 0).")
    model.add_argument("--head_type", choices=list(HEADS), default="prg", help="The head (prg_hub/heads.py).")
    model.add_argument("--feature_blocks", nargs="+", default=None,
                       help="Blocks the head reads (every head but prg), e.g. mid_block up_blocks.0.")
    model.add_argument("--feature_times", nargs="+", type=float, default=None,
                       help="Increasing times in (0, 1] at which the blocks are read (default: --feature_t).")
    model.add_argument("--feature_t", type=float, default=1.0, help="Time of the representation x_t (1 is noise).")
    model.add_argument("--num_steps", type=int, default=20,
                       help="Solver steps from t = 0 to feature_t (prg head) or to the last of --feature_times.")
    model.add_argument("--solver", choices=SOLVERS, default="euler")
    model.add_argument("--gradient_checkpointing", action="store_true", help="Recompute each solver step in backward.")
    model.add_argument("--adjoint", action="store_true", help="torchdiffeq adjoint gradients (approximate).")
    model.add_argument("--fm_loss_weight", type=float, default=0.0, help="β in CE + β·L_FM.")
    model.add_argument("--label_smoothing", type=float, default=0.1)
    model.add_argument("--head_bias", action=argparse.BooleanOptionalAction, default=True,
                       help="A bias in the head's last Linear (the released code has none: --no-head_bias).")

    data = parser.add_argument_group("data")
    data.add_argument("--dataset", required=True, help="Hub dataset id or local folder (parquet or imagefolder).")
    data.add_argument("--image_column", default=None, help="Detected (img/image) when omitted.")
    data.add_argument("--label_column", default=None, help="Detected (label/labels) when omitted.")
    data.add_argument("--train_split", default="train")
    data.add_argument("--eval_split", default="eval", help="'eval' picks test, validation, valid or val.")
    data.add_argument("--max_train_samples", type=int, default=None)
    data.add_argument("--max_eval_samples", type=int, default=None)
    data.add_argument("--augmentation", choices=AUGMENTATIONS, default="crop_flip")
    data.add_argument("--random_erasing", type=float, default=0.0, help="Probability (official recipe: 0.25).")
    data.add_argument("--dataloader", choices=DATALOADERS, default="auto",
                      help="Training data. device: decoded once onto the accelerator; stream: every image decoded "
                           "every epoch, in workers; auto: device when the split fits (prg_hub/training_data.py). "
                           "Either way the batches are augmented on the accelerator. Evaluation always streams.")
    data.add_argument("--dataloader_num_workers", type=int, default=0, help="Workers of the stream path.")
    data.add_argument("--cache_dir", default=None)

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--train_batch_size", type=int, default=128, help="Per-process batch size.")
    optim.add_argument("--eval_batch_size", type=int, default=256, help="Per-process batch size.")
    optim.add_argument("--gradient_accumulation_steps", type=int, default=1)
    optim.add_argument("--num_train_epochs", type=int, default=200)
    optim.add_argument("--max_train_steps", type=int, default=None, help="Overrides --num_train_epochs.")
    optim.add_argument("--learning_rate", type=float, default=None, help="Default: 1.25e-4 · global batch / 512.")
    optim.add_argument("--weight_decay", type=float, default=0.05)
    optim.add_argument("--num_warmup_epochs", type=float, default=5.0)
    optim.add_argument("--num_warmup_steps", type=int, default=None, help="Overrides --num_warmup_epochs.")
    optim.add_argument("--warmup_start_lr_ratio", type=float, default=0.0,
                       help="The warm-up starts at this fraction of the learning rate (released: 1e-3).")
    optim.add_argument("--min_lr_ratio", type=float, default=0.0,
                       help="The cosine ends at this fraction of the learning rate (released: 1e-2).")
    optim.add_argument("--skip_nonfinite_steps", type=int, default=0,
                       help="Skip up to N optimizer steps whose loss is NaN or Inf (no update) before stopping.")
    optim.add_argument("--max_grad_norm", type=float, default=0.0, help="Gradient clipping; 0 disables it.")
    optim.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default=None)
    optim.add_argument("--seed", type=int, default=0)

    run = parser.add_argument_group("outputs")
    run.add_argument("--output_dir", required=True)
    run.add_argument("--checkpointing_steps", type=int, default=1000)
    run.add_argument("--checkpoints_total_limit", type=int, default=None)
    run.add_argument("--resume_from_checkpoint", default=None, help="'latest' or a checkpoint folder.")
    run.add_argument("--report_to", default=None, help="Accelerate tracker, e.g. tensorboard or wandb.")
    run.add_argument("--record_batches", action="store_true",
                     help="Record a SHA-256 digest of the global batches in metrics.json (one gather per step).")
    run.add_argument("--push_to_hub", action="store_true", help="Push the final model and its card to the Hub.")
    run.add_argument("--hub_model_id", default=None, help="The Hub repo to push to, e.g. org/name.")
    add_fast_step_arguments(parser)
    args = parse_args_with_recipe(parser, argv)
    if args.push_to_hub and not args.hub_model_id:
        parser.error("--push_to_hub needs --hub_model_id org/name.")
    if args.model_name_or_path is None and not args.from_scratch:
        parser.error("Give the pretrained flow with --model_name_or_path, or pass --from_scratch for the baseline.")
    for name in ("train_batch_size", "eval_batch_size", "gradient_accumulation_steps", "checkpointing_steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}.")
    if args.skip_nonfinite_steps < 0:
        parser.error(f"--skip_nonfinite_steps must be >= 0, got {args.skip_nonfinite_steps}.")
    if args.dropout is not None and not args.from_scratch:
        parser.error("--dropout sets the dropout of a network trained --from_scratch; a pretrained flow keeps its own.")
    if args.dropout is not None and not 0 <= args.dropout < 1:
        parser.error(f"--dropout is a probability in [0, 1), got {args.dropout}.")
    for name in ("warmup_start_lr_ratio", "min_lr_ratio"):
        if not 0 <= getattr(args, name) <= 1:
            parser.error(f"--{name} is a fraction of the learning rate, in [0, 1]; got {getattr(args, name)}.")
    return args


def build_model(args, label_names: list[str]) -> PRGForImageClassification:
    """The classifier: pretrained flow + new head of --head_type, or (--from_scratch) the same architecture randomly
    initialised."""
    classifier_config = {
        "num_labels": len(label_names),
        "id2label": dict(enumerate(label_names)),
        "label2id": {name: index for index, name in enumerate(label_names)},
        "feature_t": args.feature_t,
        "num_steps": args.num_steps,
        "head_type": args.head_type,
        "feature_blocks": args.feature_blocks,
        "feature_times": args.feature_times,
        "solver": args.solver,
        "adjoint": args.adjoint,
        "fm_loss_weight": args.fm_loss_weight,
        "label_smoothing": args.label_smoothing,
        "head_bias": args.head_bias,
    }
    if not args.from_scratch:
        model = PRGForImageClassification.from_pretrained(args.model_name_or_path, **classifier_config)
        check_finite_weights(model, f"The pretrained model {args.model_name_or_path!r}")
        return model
    if args.model_name_or_path is not None:
        config = PRGConfig.from_pretrained(args.model_name_or_path, **classifier_config)
        if args.dropout is not None:
            config.backbone_config["dropout"] = args.dropout
    else:
        config = PRGConfig(
            backbone_type=args.backbone,
            backbone_config=backbone_preset(args.backbone, args.preset, args.image_size, dropout=args.dropout),
            probability_path=args.probability_path,
            **classifier_config,
        )
    return PRGForImageClassification(config)


@torch.no_grad()
def evaluate(model, dataloader, accelerator, step: int) -> float:
    """Top-1 accuracy over the whole evaluation split (every process scores its shard; duplicates are dropped).

    Raises `NonFiniteError` naming `step` when the model's outputs are NaN or Inf (a diverged run).
    """
    model.eval()
    correct, total = 0, 0
    for batch in dataloader:
        try:
            logits = model(batch["pixel_values"]).logits
        except NonFiniteError as error:
            raise NonFiniteError(
                f"Step {step}: the model diverged; evaluating it failed: {error} The run stopped without saving it. "
                "Lower --learning_rate or set --max_grad_norm, then resume from a checkpoint before this step."
            ) from error
        predictions = logits.argmax(dim=-1)
        predictions, labels = accelerator.gather_for_metrics((predictions, batch["labels"]))
        correct += (predictions == labels).sum().item()
        total += labels.numel()
    model.train()
    return correct / total


def training_function(args: argparse.Namespace) -> None:
    """Data, classifier and optimizer through `accelerator.prepare`, the training loop with an evaluation at the end
    of every epoch, then the final and best models and their records."""
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

    image_data = load_image_dataset(
        args.dataset, image_column=args.image_column, label_column=args.label_column, cache_dir=args.cache_dir
    )
    set_seed(args.seed)  # the same head initialisation on every process
    model = build_model(args, image_data.label_names)
    model.prg.gradient_checkpointing = args.gradient_checkpointing  # per-solver-step recomputation
    speed_up(model.prg, args)
    set_seed(args.seed, device_specific=True)  # dropout and β·L_FM noise differ between processes
    image_size = model.config.image_size
    processor = default_image_processor(image_size)
    train_dataloader, data_path = get_train_dataloader(
        image_data, processor, accelerator.device, dataloader=args.dataloader, train_split=args.train_split,
        train_batch_size=args.train_batch_size, max_train_samples=args.max_train_samples, seed=args.seed,
        num_workers=args.dataloader_num_workers,
    )
    _, eval_dataloader = get_dataloaders(image_data, processor, eval_split=args.eval_split,
                                         eval_batch_size=args.eval_batch_size, max_eval_samples=args.max_eval_samples,
                                         num_workers=args.dataloader_num_workers)
    # uint8 training batches become pixel values on the device, each sample augmented by (seed, epoch, index).
    augmentation = TrainAugmentation(args.augmentation, processor, random_erasing=args.random_erasing, seed=args.seed)
    num_train, num_eval = len(train_dataloader.dataset), len(eval_dataloader.dataset)

    global_batch = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    learning_rate = args.learning_rate if args.learning_rate is not None else 1.25e-4 * global_batch / 512
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=args.weight_decay,
                                  fused=args.fused_optimizer)
    model, optimizer, train_dataloader, eval_dataloader = accelerator.prepare(
        model, optimizer, train_dataloader, eval_dataloader
    )
    progress = TrainingProgress(
        len(train_dataloader), args.gradient_accumulation_steps, args.num_train_epochs, args.max_train_steps
    )
    num_warmup_steps = (
        args.num_warmup_steps if args.num_warmup_steps is not None
        else round(args.num_warmup_epochs * progress.steps_per_epoch)
    )
    lr_scheduler = accelerator.prepare(warmup_cosine_schedule(
        optimizer, num_warmup_steps, progress.max_train_steps,
        warmup_start_lr_ratio=args.warmup_start_lr_ratio, min_lr_ratio=args.min_lr_ratio,
    ))
    if args.report_to:
        accelerator.init_trackers("prg-finetune", config={k: v for k, v in vars(args).items() if v is not None})
    logger.info(
        f"{num_train} train ({data_path} data) / {num_eval} eval images, {len(image_data.label_names)} classes, "
        f"global batch {global_batch}, lr {learning_rate:.3g}, {progress.steps_per_epoch} steps per epoch, "
        f"{progress.max_train_steps} steps, {num_warmup_steps} warm-up steps"
    )

    # The evaluations so far; a checkpoint is saved after the evaluation of its step, so it carries them.
    trainer_state = {"best_top1": -1.0, "best_epoch": None, "history": []}
    checkpoint = progress.resume(accelerator, output_dir, args.resume_from_checkpoint)
    if checkpoint is not None:
        trainer_state = json.loads((checkpoint / TRAINER_STATE).read_text(encoding="utf-8"))
        evaluated_steps = [record["step"] for record in trainer_state["history"]]
        if progress.finished and progress.global_step not in evaluated_steps:
            raise ValueError(
                f"{checkpoint} is at step {progress.global_step}, at or past --max_train_steps "
                f"{progress.max_train_steps}, and its model was never evaluated, so the run has nothing to train and "
                "no final accuracy. Resume with a larger --max_train_steps, or from the run's final checkpoint."
            )

    batch_record = BatchRecord() if args.record_batches else None
    loss_guard = NonFiniteLossGuard(accelerator, optimizer, args.skip_nonfinite_steps)
    progress_bar = tqdm(total=progress.max_train_steps, initial=progress.global_step, desc="finetune",
                        disable=not accelerator.is_local_main_process)
    start_time = time.perf_counter()
    model.train()
    for epoch in progress.remaining_epochs():
        epoch_loss, epoch_batches = torch.zeros((), device=accelerator.device), 0
        for batch in augmentation.batches(progress.epoch_batches(accelerator, train_dataloader, epoch), epoch):
            with accelerator.accumulate(model):
                loss = model(batch["pixel_values"], labels=batch["labels"]).loss
                accelerator.backward(loss)
                loss_guard.observe(loss)
                # On the last micro-batch of a step: update only if every loss of the step was finite (a fused
                # optimizer is told on the device and skips a non-finite step itself: no wait for the check).
                if not accelerator.sync_gradients or loss_guard.should_step(progress.global_step + 1):
                    if accelerator.sync_gradients and args.max_grad_norm > 0:
                        accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                    optimizer.step()
                optimizer.zero_grad()
            epoch_loss += loss.detach()
            epoch_batches += 1
            if batch_record is not None:
                batch_record.add_batch(batch["index"])
            if not accelerator.sync_gradients:
                continue

            # An optimizer step ended (a skipped non-finite one too: it still counts).
            lr_scheduler.step()
            if batch_record is not None:
                batch_record.end_step(accelerator)
            progress.global_step += 1
            progress_bar.update(1)
            if progress.epoch_finished:  # the step ended an epoch or the run: score the model, keep the best
                loss_guard.raise_if_too_many_skipped(progress.global_step)
                top1 = evaluate(model, eval_dataloader, accelerator, progress.global_step)
                train_loss = accelerator.reduce(epoch_loss / epoch_batches, reduction="mean").item()
                record = {"epoch": epoch, "step": progress.global_step, "train_loss": train_loss, "eval_top1": top1}
                trainer_state["history"].append(record)
                accelerator.log(record, step=progress.global_step)
                progress_bar.set_postfix(loss=f"{train_loss:.4f}", top1=f"{top1:.4f}")
                logger.info(f"epoch {epoch}: step {progress.global_step} train_loss {train_loss:.4f} "
                            f"eval_top1 {top1:.4f}")
                if top1 > trainer_state["best_top1"]:
                    trainer_state.update(best_top1=top1, best_epoch=epoch)
                    if accelerator.is_main_process:
                        save_model(accelerator.unwrap_model(model), output_dir / "best")
            if progress.global_step % args.checkpointing_steps == 0:
                loss_guard.raise_if_too_many_skipped(progress.global_step)
                save_checkpoint(accelerator, model, output_dir, progress.global_step, args.checkpoints_total_limit,
                                extra_json={TRAINER_STATE: trainer_state})
            if progress.finished:
                break
    progress_bar.close()
    loss_guard.raise_if_too_many_skipped(progress.global_step)

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_model(accelerator.unwrap_model(model), output_dir)
        history = trainer_state["history"]
        metrics = {
            "steps": progress.global_step,
            "best_top1": trainer_state["best_top1"],
            "best_epoch": trainer_state["best_epoch"],
            "final_top1": history[-1]["eval_top1"],
            "history": history,
            "eval_split": image_data.split_name(args.eval_split),
            "eval_split_size": num_eval,
            "global_batch_size": global_batch,
            "learning_rate": learning_rate,
            "num_processes": accelerator.num_processes,
            "pretrained": None if args.from_scratch else args.model_name_or_path,
            "train_seconds": time.perf_counter() - start_time,
        }
        if batch_record is not None:
            metrics["global_batches_sha256"] = batch_record.global_sha256
        write_json(output_dir / "metrics.json", metrics)
        if args.push_to_hub:
            commit = push_training_output(output_dir, args.hub_model_id)
            logger.info(f"Pushed {output_dir} to {commit.commit_url}")
        print(
            f"finetune: best_top1={metrics['best_top1']:.4f} final_top1={metrics['final_top1']:.4f} "
            f"steps={progress.global_step} from={'scratch' if args.from_scratch else args.model_name_or_path} "
            f"output_dir={output_dir}"
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
