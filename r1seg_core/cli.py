"""`r1seg`: ask a question about a CT (once, in a conversation kept in a file, or in an interactive `chat`), evaluate
a model, show a model card, create or convert model folders.

Exit codes: 0 done, 2 bad input, 3 model folder problem, 4 out of memory, 130 cancelled, 1 anything else.
Outputs are written only when the whole answer is ready, each atomically.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .answer_output import print_answer, print_outputs, progress_bar, quiet_libraries, segment_colors, shown_path
from .errors import CancelledError, CheckpointError, InvalidInputError, OutOfMemoryError, R1SegError

EXIT_CODES = ((InvalidInputError, 2), (CheckpointError, 3), (OutOfMemoryError, 4), (CancelledError, 130), (R1SegError, 1))


def command_ask(args) -> int:
    check_outputs(args)
    from .dicom_seg import prepare_dicom_seg
    series = prepare_dicom_seg(args)   # None unless -o x.dcm; its refusals come before any work
    if args.server:
        if args.conversation:
            raise InvalidInputError("--conversation keeps the conversation in a file for a model loaded here; "
                                    "drop --server to use it (a server keeps its own conversations)")
        from .server.client import ask_command

        return ask_command(args, progress_bar())
    from .prompting import validate_question
    from .volume import read_volume

    validate_question(args.question)          # a bad question or CT fails before the model loads, not after
    quiet_libraries()
    volume = read_volume(args.ct)
    conversation = open_conversation(args.conversation, volume) if args.conversation else None
    predictor = load_predictor(args)
    result = predictor.ask(volume, args.question, conversation=conversation, progress=progress_bar(),
                           **ask_options(args))
    summary = result.to_dict()
    print_answer(summary)
    if series is not None:
        from .dicom_seg import report_dicom_seg
        args.output = report_dicom_seg(result, volume, series, args.output, predictor)   # None: no file written
    elif args.output:
        # Also when nothing was found: empty, named segments, so a script can tell "absent" from a lost file.
        result.write(args.output, volume, segment_colors(result))
    if args.json:
        result.write_json(args.json)
    print_outputs(args, summary)
    if conversation is not None:
        conversation.save(args.conversation)
        print(f"wrote {shown_path(args.conversation)} (ask again with --conversation {shown_path(args.conversation)} "
              "to follow up)")
    return 0


def ask_options(args) -> dict:
    """`Predictor.ask`'s options from `r1seg ask`/`r1seg chat` arguments (None: the model's or profile's default)."""
    return dict(overlap=args.overlap, loops=args.loops, window_batch=args.window_batch, answer_mode=args.answer_mode,
                global_step=args.global_step, sliding_window=not args.no_sliding_window, seed=args.seed)


def load_predictor(args):
    """The model `r1seg ask`/`r1seg chat` answer with, and what the user must know about it, said once."""
    from . import default_model_path
    from .inference import Predictor

    model_dir = Path(args.model) if args.model else default_model_path()
    _first_use_note(model_dir)
    predictor = Predictor(model_dir, device=args.device, dtype=args.dtype, profile=args.profile)
    if predictor.is_placeholder:
        print(f"note: {shown_path(model_dir)} is an UNTRAINED PLACEHOLDER model: the pipeline runs end to end, "
              "but answers and masks are not meaningful. Pass --model with a trained or converted model.", file=sys.stderr)
    elif not args.model:
        print("note: the bundled default model is a small demonstration model, not for clinical use; its scores are "
              "in its model card (r1seg info)", file=sys.stderr)
    return predictor


def _first_use_note(model_dir: Path) -> None:
    """The one slow load: a packaged GGUF base LLM not yet dequantised into the cache (its progress bar is hidden)."""
    from .config import R1Seg3DConfig
    from .model.packaged import cached_dequantised, dequantised_folder

    try:
        language_model = R1Seg3DConfig.load(model_dir).language_model
    except R1SegError:
        return                                  # the load itself reports what is wrong with the folder
    spec = language_model.package if language_model is not None else None
    target = dequantised_folder(spec) if spec and str(spec.get("file", "")).endswith(".gguf") else None
    if target is not None and cached_dequantised(spec) is None:
        print(f"note: first use of the base language model: it is dequantised once (seconds to a minute) and kept "
              f"in {shown_path(target.parent.parent)}", file=sys.stderr)


def open_conversation(path, volume):
    """The conversation kept in `path`: continued when it is about this CT, else (a new file, or one about another
    CT) a new one, which then replaces it when the answer is saved."""
    from .inference import Conversation

    path = Path(path)
    if not path.exists():
        return Conversation()
    conversation = Conversation.load(path)
    if not conversation.is_about(volume):
        print(f"note: {shown_path(path)} holds a conversation about another CT; this question starts a new "
              "conversation about this CT, saved in its place", file=sys.stderr)
        return Conversation()
    return conversation


DEFAULT_CHAT_FOLDER = "r1seg-output/chat"
CHAT_SHARES_ASK_OPTIONS = ("model", "device", "dtype", "overlap", "loops", "window_batch", "answer_mode", "seed", "profile",
                           "no_sliding_window", "global_step")
CHAT_HELP = """Type a question and press Enter. Commands:
  /history   the conversation so far
  /new       start a new conversation about this CT (the files written so far stay)
  /quit      end (also Ctrl-D); Ctrl-C stops the answer being computed, or drops the line being typed"""


def command_chat(args) -> int:
    """An interactive session: the model loads once; each answer is printed and its segments written as it comes."""
    from .inference import Conversation
    from .volume import read_volume

    quiet_libraries()
    folder = Path(args.out)
    folder.mkdir(parents=True, exist_ok=True)
    volume = read_volume(args.ct)
    conversation_file = folder / "conversation.json"
    conversation = open_conversation(conversation_file, volume)
    predictor = load_predictor(args)
    _enable_line_editing()
    print(f"Ask about {shown_path(args.ct)}; answers go to {shown_path(folder)}/. /help lists the commands.")
    answered = len(conversation.turns)           # numbers this session's files after a continued conversation's
    for question in _questions():
        if question in ("/quit", "/exit"):
            break
        if question == "/help":
            print(CHAT_HELP)
        elif question == "/history":
            _print_history(conversation)
        elif question == "/new":
            conversation = Conversation()
            print("new conversation")
        elif question.startswith("/"):
            print(f"unknown command {question}; /help lists the commands")
        elif _chat_turn(predictor, volume, question, conversation, args, folder / f"{answered + 1:02d}"):
            answered += 1
            conversation.save(conversation_file)
    return 0


def _questions():
    """Lines typed at the prompt until end of input; blank lines are skipped, and Ctrl-C at the prompt drops the
    line being typed, as in Python's own prompt."""
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            print()
            return
        except KeyboardInterrupt:
            print()
            continue
        if line:
            yield line


def _chat_turn(predictor, volume, question, conversation, args, stem: Path) -> bool:
    """One answer: printed, and written as STEM-<targets>.seg.nrrd and STEM.json; False when a bad question or a
    cancel ended the turn without one (the session goes on)."""
    try:
        result = predictor.ask(volume, question, conversation=conversation, progress=progress_bar(), **ask_options(args))
    except KeyboardInterrupt:
        print("cancelled; ask another question or /quit", file=sys.stderr)
        return False
    except InvalidInputError as error:
        print(f"error: {error}", file=sys.stderr)
        return False
    summary = result.to_dict()
    print_answer(summary)
    names = "-".join(t.name.replace(" ", "_") for t in result.targets[:3])
    written = []
    if result.targets:
        segments = stem.with_name(f"{stem.name}-{names}.seg.nrrd")
        result.write(segments, volume, segment_colors(result))
        written.append(segments)
    result.write_json(stem.with_suffix(".json"))
    written.append(stem.with_suffix(".json"))
    print("wrote " + ", ".join(shown_path(path) for path in written))
    return True


def _print_history(conversation) -> None:
    if not conversation.turns:
        print("(no questions yet)")
    for number, turn in enumerate(conversation.turns, start=1):
        print(f"{number}. {turn.question}\n   {getattr(turn, 'shown', '') or turn.answer}")


def _enable_line_editing() -> None:
    """Arrow keys recall earlier questions where Python has readline (not on every platform)."""
    try:
        import readline  # noqa: F401  (importing it is what enables line editing for input())
    except ImportError:
        pass


def check_outputs(args) -> None:
    """Before any work: a missing output folder or an unknown suffix would otherwise fail after the whole answer."""
    from .dicom_seg import is_dicom_seg
    from .volume import _labelmap_suffix

    if args.output and not is_dicom_seg(args.output):
        _labelmap_suffix(Path(args.output))
    for path in (Path(p) for p in (args.output, args.json, getattr(args, "conversation", None)) if p):
        if not path.parent.is_dir():
            raise InvalidInputError(f"output folder {shown_path(path.parent)} does not exist: create it first "
                                    f"(mkdir -p {shown_path(path.parent)})")


def command_info(args) -> int:
    from .config import R1Seg3DConfig
    from .model_card import PEOPLES_CARD_NAME, model_card

    folder = Path(args.model)
    config = R1Seg3DConfig.load(folder)
    print(f"{folder}")
    print(model_card(config), end="")
    # The card people wrote (the default model's holds its measured scores) follows the one written from config.json.
    if (folder / PEOPLES_CARD_NAME).is_file():
        print()
        print((folder / PEOPLES_CARD_NAME).read_text(encoding="utf-8", errors="replace"), end="")
    return 0


def command_init_model(args) -> int:
    import torch

    from .model import build_model, preset_config

    torch.manual_seed(args.seed)
    config = preset_config(args.preset)
    config.card.update(name=args.name or f"R1Seg3D {args.preset} (untrained)", untrained=True,
                       description=f"random weights from preset {args.preset!r}, seed {args.seed}", licence="Apache-2.0")
    model = build_model(config)
    model.save_pretrained(args.output)
    print(f"wrote an untrained {args.preset} model to {args.output}")
    return 0


def _target_names(text: str | None) -> tuple[str, ...] | None:
    """Comma-separated names -> canonical vocabulary names; an unknown one is an error naming it."""
    if not text:
        return None
    from .vocabulary import load_vocabulary

    vocabulary, names = load_vocabulary(), []
    for word in (part.strip() for part in text.split(",") if part.strip()):
        structure = vocabulary.lookup(word)
        if structure is None:
            raise InvalidInputError(f"--targets: {word!r} is not a structure of the vocabulary")
        names.append(structure.name)
    return tuple(names)


def command_evaluate(args) -> int:
    from .evaluation import EvaluationSettings, compare, evaluate, merge, parse_shard
    from .evaluation.questions import KINDS

    if args.compare:
        if not args.out:
            raise InvalidInputError("--compare needs --out DIR for the comparison")
        print(f"wrote {compare(*args.compare, args.out) / 'compare.md'}")
        return 0
    if args.merge:
        print(f"wrote {merge(args.merge) / 'report.md'}")
        return 0
    if not (args.data and args.out):
        raise InvalidInputError("r1seg evaluate needs --data LIST.json and --out REPORT_DIR "
                                "(or --merge REPORT_DIR, or --compare A B --out DIR)")
    kinds = tuple(k.strip() for k in args.kinds.split(",")) if args.kinds else KINDS
    settings = EvaluationSettings(
        data=Path(args.data), out=Path(args.out), model=Path(args.model) if args.model else None, split=args.split,
        loops=args.loops, overlap=args.overlap, profile=args.profile, sliding_window=not args.no_sliding_window,
        kinds=kinds,
        max_questions_per_kind=args.max_questions_per_kind, targets=_target_names(args.targets), device=args.device,
        dtype=args.dtype,
        window_batch=args.window_batch, save_masks=args.save_masks, shard=parse_shard(args.shard),
        max_cases=args.max_cases)
    report = evaluate(settings)
    if report is None:
        print(f"scored this shard's cases into {args.out}; the report is written when every case is scored "
              f"(r1seg evaluate --merge {args.out})")
    else:
        print(f"wrote {report / 'report.md'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .model.builder import PRESETS

    parser = argparse.ArgumentParser(prog="r1seg", description="Reasoning segmentation of CT (R1Seg-3D).")
    commands = parser.add_subparsers(dest="command", required=True)

    ask = commands.add_parser("ask", help="answer a question about a CT and write the masks")
    ask.add_argument("ct", help="CT file (.nii/.nii.gz/.nrrd/.mha) or DICOM series folder")
    ask.add_argument("question", help='e.g. "segment the liver"')
    ask.add_argument("-o", "--output", help="labelmap to write: .seg.nrrd (Slicer segmentation), .nrrd or .nii.gz")
    ask.add_argument("--model", help="model folder or name from `r1seg models` (default: the bundled default model)")
    ask.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda or mps")
    ask.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                     help="weights and activations: auto is bfloat16 on a GPU, float32 on a CPU; bfloat16 halves a CPU's memory use")
    ask.add_argument("--overlap", type=float, default=None,
                     help="window overlap in [0, 1) (default: the profile's, 0.25 project, 0.5 original)")
    ask.add_argument("--loops", type=int, default=None, help="refinement loops 0-3 (default: the model's)")
    ask.add_argument("--window-batch", type=int, default=None, help="windows per batch (default 16 on GPU, 4 on CPU)")
    ask.add_argument("--answer-mode", choices=("constrained", "generate", "sample"), default=None,
                     help="per-window answers: score the answer templates (fast; the project profile's default), "
                          "generate greedily (the original profile's default) or sample top-p 0.9 from --seed")
    ask.add_argument("--seed", type=int, default=0, help="seed of --answer-mode sample (default 0)")
    ask.add_argument("--profile", choices=("auto", "project", "original"), default="auto",
                     help="inference profile: original = the published code's preprocessing, fusion and answers; "
                          "auto (default) picks it for models converted from the published weights")
    ask.add_argument("--no-sliding-window", action="store_true",
                     help="the whole CT resized to one window instead of sliding windows (the paper's Fig. 4 ablation)")
    ask.add_argument("--global-step", choices=("off", "answer", "skip"), default="answer",
                     help="one pass over the whole CT for the text answer (answer), also skipping far windows (skip)")
    ask.add_argument("--json", help="write the result (answer, volumes, timings) as JSON")
    ask.add_argument("--conversation", metavar="FILE.json",
                     help="keep the conversation in this file (the CT's fingerprint, the turns, and the masks beside "
                          "it in FILE.masks.npz): a later ask with the same file follows up on this answer; a file "
                          "about another CT is replaced by a new conversation")
    ask.add_argument("--timings", action="store_true", help="print per-step timings")
    ask.add_argument("--server", metavar="URL", help="ask a running `r1seg serve` (e.g. http://127.0.0.1:8740) "
                     "instead of loading the model here; --model, --device, --dtype and --profile are then the server's")
    ask.add_argument("--token-file", help="with --server: file holding the server's token")
    ask.set_defaults(handler=command_ask)

    chat = commands.add_parser("chat", help="an interactive conversation about one CT in this terminal",
                               description="Ask questions about one CT, one after another, with one model load. Each "
                               "answer's segments are written to --out as it comes (01-liver.seg.nrrd, 01.json, ...), "
                               "and the conversation to --out/conversation.json, which `r1seg ask --conversation` and "
                               "a later `r1seg chat` continue. Type /help for the commands.")
    chat.add_argument("ct", help="CT file (.nii/.nii.gz/.nrrd/.mha) or DICOM series folder")
    chat.add_argument("--out", default=DEFAULT_CHAT_FOLDER,
                      help=f"folder for the answers' segments and the conversation (default {DEFAULT_CHAT_FOLDER})")
    # The same model and answer options as `ask`: the same argparse actions, so the two never drift apart.
    for action in ask._actions:
        if action.dest in CHAT_SHARES_ASK_OPTIONS:
            chat._add_action(action)
    chat.set_defaults(handler=command_chat)

    info = commands.add_parser("info", help="print a model folder's card")
    info.add_argument("model")
    info.set_defaults(handler=command_info)

    init = commands.add_parser("init-model", help="write a fresh, untrained model folder from a preset")
    init.add_argument("output")
    init.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    init.add_argument("--seed", type=int, default=0)
    init.add_argument("--name")
    init.set_defaults(handler=command_init_model)

    evaluate = commands.add_parser("evaluate", help="score a model on a data list: cases.csv, report.md, plots")
    evaluate.add_argument("--data", help="data list JSON (cases, or an M3D-Seg style train/test split)")
    evaluate.add_argument("--out", help="report folder (resumed when it holds the same run)")
    evaluate.add_argument("--model", help="model folder (default: the bundled default model)")
    evaluate.add_argument("--split", default="test", help="the part of a split file to score (default test)")
    evaluate.add_argument("--loops", type=int, default=None, help="refinement loops 0-3 (default: the model's)")
    evaluate.add_argument("--overlap", type=float, default=None,
                          help="window overlap in [0, 1) (default: the profile's, 0.25 project, 0.5 original)")
    evaluate.add_argument("--profile", choices=("auto", "project", "original"), default="auto",
                          help="inference profile (see r1seg ask --profile); auto picks original for converted weights")
    evaluate.add_argument("--no-sliding-window", action="store_true",
                          help="resize the whole CT to one window (the paper's Fig. 4 ablation)")
    evaluate.add_argument("--kinds", help="comma-separated question kinds (default: all of "
                          "explicit,implicit,multi,absent_in_region,absent_out_of_region,custom)")
    evaluate.add_argument("--max-questions-per-kind", type=int, default=None,
                          help="at most this many questions of each kind per case (default: all)")
    evaluate.add_argument("--targets", help="comma-separated structures to ask about, e.g. those the model was trained "
                          "on (default: every labelled one); out-of-region absent questions may name any structure")
    evaluate.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    evaluate.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto")
    evaluate.add_argument("--window-batch", type=int, default=None, help="windows per batch")
    evaluate.add_argument("--save-masks", action="store_true",
                          help="write each prediction as REPORT_DIR/masks/<id>__<target>__<kind>.nii.gz")
    evaluate.add_argument("--shard", default="0/1", help="I/N: score cases I, I+N, ... (0 <= I < N; default 0/1)")
    evaluate.add_argument("--max-cases", type=int, default=None,
                          help="stop after scoring this many cases (the next run continues)")
    evaluate.add_argument("--merge", metavar="REPORT_DIR", help="write the report from every shard's rows")
    evaluate.add_argument("--compare", nargs=2, metavar=("REPORT_A", "REPORT_B"),
                          help="two finished reports side by side (with --out DIR)")
    evaluate.set_defaults(handler=command_evaluate)

    from .convert.commands import register
    register(commands)
    from .server.command import add_parser as add_serve_parser
    add_serve_parser(commands)
    from .registry.command import register as register_models
    register_models(commands)
    from .batch import register as register_batch
    register_batch(commands, ask)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if getattr(args, "model", None) and not getattr(args, "server", None):   # a folder or a registry name
            from .registry import resolve_model
            args.model = str(resolve_model(args.model))
        return args.handler(args)
    except R1SegError as error:
        print(f"error: {error}", file=sys.stderr)
        return next(code for kind, code in EXIT_CODES if isinstance(error, kind))
    except KeyboardInterrupt:
        print("cancelled", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
