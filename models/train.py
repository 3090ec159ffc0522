"""``python -m models.train``: joint image-classification + MLM pretraining of ViT-BERT on mixed mmload streams.

The objective is the ViT-BERT paper's "Joint" baseline,

    loss = image_loss_mean + text_loss_weight * (mlm_loss_mean + nsp_weight * nsp_loss_mean)

(the NSP term with ``--nsp`` only: sentence-order pairs from ``mmload.masking.NextSegmentPairs``), with means
taken from the summed losses and counts of ``ModelOutput`` (NOTE [loss normalization] in ``models.step``),
optional knowledge distillation (``models.kd``) and optional iterative gradient masking (``models.gradmask``).
Runs alone or under ``torchrun`` (DistributedDataParallel, shards split by rank), checkpoints and resumes exactly
(model, optimizer, schedule, RNG, gradient mask and the loader's position), and writes ``OUT/metrics.jsonl`` and
TensorBoard scalars under ``OUT/tb``. ``--eval-only --limit-samples K`` prints one JSON line of mean losses and
accuracies on the first K samples of the stream, the same samples for every strategy.

This module is the command line: it fills a :class:`~models.config.TrainConfig` and hands it to
:func:`models.loop.train`. The pieces live beside it, one idea each: ``models.build`` (model, freeze modes,
optimizer), ``models.step`` (losses, ``train_step``, ``PhaseTimer``), ``models.loop`` (the run),
``models.evaluate``, ``models.transforms`` (MLM masking, sentence-order pairs), ``models.distributed`` and
``models.metrics_log``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence

from mmload.commands import HelpFormatter, Parser, add_verbose, run_command
from mmload.decode import RESOLUTIONS
from mmload.reader import ReadLimits
from mmload.strategy import STRATEGIES
from models.config import FREEZE_MODES, PRECISIONS, ModelConfig, TrainConfig
from models.loop import train

D = TrainConfig  # the defaults of every option are TrainConfig's


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="python -m models.train", formatter_class=HelpFormatter,
        description="Joint image-classification + masked-language-model pretraining of ViT-BERT on mixed "
                    "image/text webdataset shards, with one of mmload's five batching strategies.")
    g = p.add_argument_group("data")
    g.add_argument("--data", action="append", metavar="SHARDS[@WEIGHT]",
                   help="shards: a path, brace pattern (a/{000..009}.tar) or folder of *.tar; repeat to blend "
                        "several sources by WEIGHT. Default: the cached builtin shards (made on first use)")
    g.add_argument("--strategy", default=D.strategy, choices=STRATEGIES, help="how a list of samples becomes a batch")
    g.add_argument("--batch-size", type=int, default=None,
                   help=f"samples per micro-batch and process (default {D.batch_size})")
    g.add_argument("--max-tokens", type=int, metavar="N",
                   help="token-budget micro-batches instead of --batch-size (padded, bucketed, nested): as many "
                        "samples as fit N tokens, text (padded where the layout pads) plus patches and class token "
                        "per image")
    g.add_argument("--num-workers", type=int, default=D.num_workers, help="DataLoader worker processes per process")
    g.add_argument("--tokenizer", metavar="NAME_OR_PATH",
                   help="HF tokenizer for the texts (default: the one saved beside the first shard, else the "
                        "bundled bert-base-uncased WordPiece)")
    g.add_argument("--no-shuffle", dest="shuffle", action="store_false",
                   help="read shards and samples in order (training shuffles by default)")
    ReadLimits.add_arguments(g)
    g.add_argument("--resolution", default=D.resolution, choices=RESOLUTIONS,
                   help="square: shorter side resized to --image-size, centre crop; native: each image's aspect "
                        "ratio kept, scaled (down only) to at most --max-patches patches, batches padded to their "
                        "largest grid with a patch mask (nested packs only real patches) (default square)")
    g.add_argument("--max-patches", type=int, metavar="N",
                   help="--resolution native: patches per image, the class token not counted (default: the square "
                        "grid, (image size / patch size) ** 2)")
    g.add_argument("--mask-prob", type=float, default=D.mask_prob, help="MLM masking probability per token")
    g.add_argument("--nsp", action="store_true",
                   help="add next-sentence prediction: each long enough text is cut in two segments, kept in order "
                        "or swapped (ALBERT's sentence order), and a head on [CLS] tells which")
    g = p.add_argument_group("model")
    g.add_argument("--preset", default=D.preset, choices=sorted(ModelConfig.PRESETS), help="model size")
    g.add_argument("--num-classes", type=int, help="image classes; default: from the shards' manifest, else 10")
    g.add_argument("--image-size", type=int, help="override the preset's image size (pixels, square)")
    g.add_argument("--max-text-len", type=int, help="override the preset's number of text positions")
    g.add_argument("--dropout", type=float, help="override the preset's dropout")
    g.add_argument("--emb-dim", type=int, help="width of precomputed embeddings (embeddings strategy); default: "
                                               "read from the first sample")
    g.add_argument("--freeze", default=D.freeze, choices=FREEZE_MODES,
                   help="full: train everything; frozen: train only embeddings, position embeddings, layer norms "
                        "and heads (Frozen Pretrained Transformer); scratch: random init, train everything")
    g.add_argument("--init-bert", metavar="PATH", help="initialize text tokenizer + shared encoder from a local HF "
                                                       "BERT checkpoint (encoder widths come from it)")
    g.add_argument("--init-vit", metavar="PATH", help="initialize image tokenizer + shared encoder from a local HF "
                                                      "ViT checkpoint (encoder widths come from it)")
    g = p.add_argument_group("optimization")
    g.add_argument("--steps", type=int, default=D.steps, help="optimizer steps")
    g.add_argument("--lr", type=float, default=D.lr, help="peak learning rate (AdamW)")
    g.add_argument("--weight-decay", type=float, default=D.weight_decay,
                   help="AdamW weight decay (not on biases, norms)")
    g.add_argument("--warmup", type=int, default=D.warmup, help="linear warm-up steps (capped at --steps)")
    g.add_argument("--power", type=float, default=D.power, help="power of the polynomial decay after warm-up")
    g.add_argument("--grad-accum", type=int, default=D.grad_accum, help="micro-batches per optimizer step")
    g.add_argument("--grad-clip", type=float, default=D.grad_clip,
                   help="clip the gradient norm to this; 0: no clipping")
    g.add_argument("--text-loss-weight", type=float, default=D.text_loss_weight,
                   help="weight of the MLM (+ NSP) mean loss")
    g.add_argument("--nsp-weight", type=float, default=D.nsp_weight,
                   help="weight of the NSP mean loss within the text term")
    g.add_argument("--precision", default=D.precision, choices=PRECISIONS,
                   help="autocast dtype on CUDA; the CPU always runs fp32")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--seed", type=int, default=D.seed, help="seed of the weights, the data order and the MLM masks")
    g.add_argument("--device", default=D.device, help="auto (cuda if available), cpu, cuda or cuda:N")
    g = p.add_argument_group("knowledge distillation")
    g.add_argument("--kd-alpha", type=float, default=D.kd_alpha,
                   help="loss = (1-alpha)*CE + alpha*T^2*KL(teacher || student); 0: no distillation")
    g.add_argument("--kd-temperature", type=float, default=D.kd_temperature,
                   help="softmax temperature T of the KD term")
    g.add_argument("--text-teacher", metavar="HF_PATH", help="HF masked LM (e.g. BertForMaskedLM) with our "
                                                             "vocabulary, for MLM distillation")
    g.add_argument("--image-teacher", metavar="PATH", help="HF image classifier folder or mmload checkpoint file, "
                                                           "for image distillation")
    g.add_argument("--teacher-logits", action="store_true",
                   help="image distillation from the teacher logits that `mmload precompute --teacher` stored in "
                        "the shards (with --strategy embeddings)")
    g = p.add_argument_group("gradient masking (ViT-BERT Algorithm 1)")
    g.add_argument("--mask-ratio", type=float, default=D.mask_ratio,
                   help="final fraction of shared-encoder entries updated by the text gradient; 0: no gradient "
                        "masking")
    g.add_argument("--mask-step", type=float, default=D.mask_step, help="first mask ratio and its increment")
    g.add_argument("--mask-interval", type=int, default=D.mask_interval,
                   help="steps between mask-ratio increments (the mask is recomputed at each)")
    g = p.add_argument_group("output, checkpoints, evaluation")
    g.add_argument("--out", metavar="DIR", help="write metrics.jsonl, tb/ and checkpoint-STEP.pt here; none if unset")
    g.add_argument("--log-every", type=int, default=D.log_every, help="steps between metric lines")
    g.add_argument("--log-keys", action="store_true",
                   help="every rank appends one line per micro-batch to OUT/keys-rank{RANK}.jsonl: "
                        '{"step", "micro", "epoch", "keys"}, to audit which samples each step saw')
    g.add_argument("--save-every", type=int, default=D.save_every,
                   help="steps between checkpoints (0: only the final one)")
    g.add_argument("--keep-checkpoints", type=int, default=D.keep_checkpoints, metavar="N",
                   help="keep only the newest N checkpoints in --out; 0 keeps every one")
    g.add_argument("--resume", metavar="PATH", help="continue from a checkpoint file or the latest in a folder; with "
                                                    "--eval-only: the weights to evaluate")
    g.add_argument("--eval-only", action="store_true", help="evaluate, print one JSON line and exit")
    g.add_argument("--limit-samples", type=int, default=D.limit_samples,
                   help="--eval-only: evaluate the first K samples")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no tqdm progress bar")
    add_verbose(p)
    return p


def parse_config(argv: Sequence[str] | None = None) -> TrainConfig:
    """The TrainConfig of a command line (``sys.argv[1:]`` when ``argv`` is None); bad values raise ValueError."""
    return _config(build_parser().parse_args(argv))


def _config(args: argparse.Namespace) -> TrainConfig:
    values = vars(args)
    if values["batch_size"] is not None and values["max_tokens"] is not None:
        raise ValueError(f"--batch-size {values['batch_size']} and --max-tokens {values['max_tokens']}: give one, "
                         "samples or tokens per micro-batch")
    values = {**values, "batch_size": D.batch_size if values["batch_size"] is None else values["batch_size"]}
    return TrainConfig(**{f.name: values[f.name] for f in dataclasses.fields(TrainConfig)})


def main(argv: Sequence[str] | None = None) -> int:
    """Exit status 0, 2 for a mistake on the command line, 1 for bad data or a failed write (NOTE [one-line
    errors] in :mod:`mmload.commands`)."""
    args = build_parser().parse_args(argv)

    def run() -> None:
        train(_config(args))

    return run_command("python -m models.train", run, args.verbose)


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["build_parser", "main", "parse_config", "train"]
