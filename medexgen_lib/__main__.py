"""Command line.

    python -m medexgen_lib run --profile demo [--from NN] [--to NN] [--seeds N] [-p key value ...]
    python -m medexgen_lib train --profile full [--resume] [-p key value ...]   (also under accelerate launch)
    python -m medexgen_lib generate --model DIR FRONTAL [LATERAL] [--json]
    python -m medexgen_lib score PREDICTIONS [--profile demo] [--out metrics.json]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from medexgen_lib.config import ConfigError
from medexgen_lib.pipeline import StageFailed, StageInterrupted, format_summary, run_pipeline
from medexgen_lib.seeds import seed_count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m medexgen_lib",
                                     description="MedExGen: chest X-ray report generation")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run the numbered notebooks headless with papermill")
    run.add_argument("--profile", default="demo", help="config preset: demo, full or mimic")
    run.add_argument("--from", dest="start", help="first stage to run, e.g. 03")
    run.add_argument("--to", dest="stop", help="last stage to run, e.g. 05")
    run.add_argument("-p", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"),
                     help="config override, e.g. -p data.n_phantom_studies 200")
    run.add_argument("--seeds", type=seed_count, default=1,
                     help="train and evaluate N seeds (seed, seed+1, ...; extra ones in "
                          "seeds/seed_<s>/) and write logs/metrics_test_seeds.json")
    train = commands.add_parser("train", help="stage 04 alone; run it under `accelerate launch` for several GPUs")
    train.add_argument("--profile", default="demo")
    train.add_argument("--resume", action="store_true", help="continue from checkpoints/last")
    train.add_argument("-p", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"))
    generate = commands.add_parser("generate", help="write the report for new images (PNG, JPEG, DICOM)")
    generate.add_argument("--model", required=True, help="a model folder (models/final)")
    generate.add_argument("images", nargs="+", help="frontal image, then optionally the lateral one")
    generate.add_argument("--json", action="store_true",
                          help="print JSON: images, report, decoder_text (the decoder's own text), "
                               "post_processing (the steps that changed it) and observations (the labeler's)")
    generate.add_argument("--beams", type=int, help="beam size (1: greedy); default: as the model was evaluated")
    generate.add_argument("--max-new-tokens", type=int, help="default: as the model was evaluated")
    generate.add_argument("--length-penalty", type=float, help="default: as the model was evaluated")
    generate.add_argument("--no-repeat-ngram-size", type=int, help="default: as the model was evaluated")
    score = commands.add_parser("score", help="score a predictions file (CSV or JSON of id, prediction)")
    score.add_argument("predictions", help="CSV or JSON file with uid/id and prediction [and reference]")
    score.add_argument("--profile", default="demo", help="config preset whose studies table gives references")
    score.add_argument("-p", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"))
    score.add_argument("--meteor", action="store_true", help="also METEOR (needs Java)")
    score.add_argument("--split", default="test", help="split whose coverage is checked (default test)")
    score.add_argument("--out", help="write the metrics as JSON here")
    score.add_argument("--field", default="prediction",
                       help="column holding the predictions (default prediction; decoder_text in stage 05's "
                            "predictions file: the decoder's own text before side words, bank or planning)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    try:
        if args.command == "run" and args.seeds > 1:
            from medexgen_lib.seeds import bootstrap_table, run_seeds, seeds_table

            results, aggregate = run_seeds(args.profile, dict(args.p), args.seeds, args.start, args.stop)
            print(format_summary(results))
            print(seeds_table(aggregate).to_string())
            print(bootstrap_table(aggregate).to_string())
        elif args.command == "run":
            print(format_summary(run_pipeline(args.profile, dict(args.p), args.start, args.stop)))
        elif args.command == "train":
            from medexgen_lib.config import load_config
            from medexgen_lib.train import train as run_training

            print(run_training(load_config(args.profile, dict(args.p)), resume=args.resume))
        elif args.command == "generate":
            _generate(args)
        else:
            _score(args)
    except StageInterrupted as exc:
        print(f"interrupted: {exc}", file=sys.stderr)
        return 130
    except (StageFailed, ConfigError, ValueError, OSError, RuntimeError) as exc:
        # Our errors carry one sentence naming the file or value; print that, not a traceback.
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def _generate(args) -> None:
    import json

    from medexgen_lib.inference import check_decode, generate_report, saved_decode
    from medexgen_lib.model import ReportGenerator

    given = {"num_beams": args.beams, "max_new_tokens": args.max_new_tokens, "length_penalty": args.length_penalty,
             "no_repeat_ngram_size": args.no_repeat_ngram_size}
    for key, value in given.items():
        if value is not None:
            check_decode(key, value, "--" + ("beams" if key == "num_beams" else key.replace("_", "-")))
    model = ReportGenerator.from_pretrained(args.model)
    decode = saved_decode(model, args.model, given)
    result = generate_report(model, args.images, decode)
    print(json.dumps(result, indent=2) if args.json else result["report"])


def _score(args) -> None:
    from medexgen_lib.config import load_config
    from medexgen_lib.evaluate import score_predictions_file
    from medexgen_lib.files import write_json

    if (args.out and os.path.exists(args.out) and os.path.exists(args.predictions)
            and os.path.samefile(args.out, args.predictions)):
        raise ValueError(f"--out {args.out} is the predictions file {args.predictions} itself; "
                         "the metrics would replace the predictions. Give --out another file name")
    metrics = score_predictions_file(args.predictions, load_config(args.profile, dict(args.p)), args.meteor,
                                     args.split, args.field)
    print(f"references: {metrics['references_from']}\nconvention: {metrics['reference_convention']}")
    for key, value in metrics.items():
        if isinstance(value, float):
            print(f"{key:<32}{value:.4f}")
    print(f"{'degenerate_predictions':<32}{metrics['degenerate_predictions']} of {metrics['n']}")
    for warning in metrics["warnings"]:
        print(f"WARNING: {warning}")
    if args.out:
        write_json(args.out, metrics)


if __name__ == "__main__":
    sys.exit(main())
