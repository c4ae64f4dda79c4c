"""``medsam3`` command line: segment a CT/MR volume from structure names.

    medsam3 segment ct.nii.gz --prompt liver --prompt spleen --model DIR_OR_HUB_ID -o liver_spleen.nii.gz
    medsam3 segment ct.nii.gz --prompt liver --server https://gpu-box:8765 --token-file token.txt
    medsam3 serve --model DIR_OR_HUB_ID --host 0.0.0.0 --port 8765 --token-file token.txt
    medsam3 convert sam3.pt sam3_hf/ [--lora best_lora_weights.pt]

Exit codes: 0 success, 2 bad input / output / model error (one sentence names the problem), 130
cancelled with Ctrl-C. No output file is written unless all of them could be written.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from . import __version__
from .common.errors import InputError, MedSAM3Error, ModelLoadError
from .common.prompts import default_dictionary, split_prompt_text
from .common.resources import resources_dir

log = logging.getLogger("medsam3")


def default_model() -> str:
    """``$MEDSAM3_MODEL``, else the demo model shipped in ``Resources/demo_model``."""
    env = os.environ.get("MEDSAM3_MODEL")
    if env:
        return env
    demo = resources_dir() / "demo_model"
    if (demo / "config.json").is_file():
        return str(demo)
    raise ModelLoadError("no --model given, MEDSAM3_MODEL is not set and no demo model is installed in "
                         f"{demo}; pass --model with a model folder or a hub id such as facebook/sam3")


def _output_default(input_path: Path) -> Path:
    name = input_path.name.rstrip("/") or "volume"
    for ext in (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd"):
        if name.lower().endswith(ext):
            name = name[: -len(ext)]
            break
    return Path.cwd() / f"{name}_medsam3.nii.gz"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medsam3", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    seg = sub.add_parser("segment", help="segment structures named by text in a CT/MR volume",
                         description="Segment every prompt through the volume and write a label map on the input "
                                     "grid, a JSON sidecar, and optionally a Slicer .seg.nrrd and a PNG overlay.")
    seg.add_argument("input", type=Path, help="NIfTI/NRRD/MHA file or a DICOM series folder; for a batch, a folder of "
                                              "them, a CSV list or a dataset JSON (with --output-dir)")
    seg.add_argument("--series", metavar="UID", help="DICOM folder: the SeriesInstanceUID to read (default: the "
                                                     "folder's largest series; the error of a tie lists them all)")
    seg.add_argument("-p", "--prompt", action="append", required=True,
                     help="structure name, e.g. 'liver' (repeat, or separate with commas)")
    seg.add_argument("-m", "--model", help="model folder, hub id, or original .pt checkpoint (converted once, cached; "
                                           "default: $MEDSAM3_MODEL, else the demo model)")
    seg.add_argument("-o", "--output", type=Path, help="label map path (.nii.gz/.nrrd/.mha; default "
                                                         "<input>_medsam3.nii.gz in the current folder)")
    seg.add_argument("--output-dir", type=Path, help="batch: the folder for every case's outputs and summary.csv "
                                                     "(input: a folder of volumes, a CSV list or a dataset JSON)")
    seg.add_argument("--resume", action="store_true", help="batch: keep the cases whose outputs are all there")
    seg.add_argument("--label-format", default=".nii.gz", help="batch: the label maps' format (.nii.gz, .nii, .nrrd, "
                                                              ".mha; default .nii.gz)")
    seg.add_argument("--seg-nrrd", action="store_true", help="also write <output>.seg.nrrd for 3D Slicer")
    seg.add_argument("--dicom-seg", action="store_true",
                     help="also write <output>.seg.dcm, a DICOM Segmentation referencing the input DICOM series "
                          "(for PACS; needs a DICOM series input and highdicom)")
    seg.add_argument("--overlay", action="store_true", help="also write <output>_overlay.png to look at")
    seg.add_argument("--overwrite", action="store_true", help="replace existing output files")
    seg.add_argument("--mode", choices=["propagate", "slices", "clips"], default=None,
                     help="propagate: detector + memory-bank tracker through the whole volume; slices: detector per "
                          "slice; clips: Medical SAM3's protocol, the text prompt re-detected and the memory reset "
                          "every --clip-length slices (default: the model's own, default_mode in its "
                          "medsam3_preprocessing.json, else propagate)")
    seg.add_argument("--clip-length", type=int, default=4, help="clips: slices per clip (default 4)")
    seg.add_argument("--threshold", type=float, default=0.5, help="instance score threshold (default 0.5)")
    seg.add_argument("--mask-threshold", type=float, default=None,
                     help="mask probability threshold (default: the model's own, else 0.5)")
    seg.add_argument("--new-object-threshold", type=float, default=None,
                     help="propagate: detection score that starts a new track (default: the model's, 0.7)")
    seg.add_argument("--shared-anchor", action="store_true",
                     help="propagate: start all prompts at one slice instead of each at its own best slice")
    seg.add_argument("--instances", choices=["best", "union"], default="union",
                     help="union (default): every instance found above the threshold (both lungs, every "
                          "vertebra); best: only the most confident instance per slice")
    seg.add_argument("--window", default="auto",
                     help="CT window: auto, soft_tissue, abdomen, lung, bone, brain (default auto)")
    seg.add_argument("--modality", default="auto", help="auto (file tag, else HU heuristic), CT, MR, ...")
    seg.add_argument("--slice-axis", choices=["k", "j", "i"], default="k", help="index axis to slice along")
    seg.add_argument("--batch-size", type=int, default=4, help="slices per forward pass (default 4)")
    seg.add_argument("--min-component-voxels", type=int, default=0, help="clean-up: drop smaller 3D components")
    seg.add_argument("--fill-holes", action="store_true", help="clean-up: fill enclosed holes")
    seg.add_argument("--largest-component", action=argparse.BooleanOptionalAction, default=None,
                     help="clean-up: keep only each structure's largest 3D component (--no-largest-component: "
                          "never; default: the model's own choice per concept)")
    seg.add_argument("--label-type", choices=["uint8", "uint16"], default="uint8", help="label map voxel type")
    seg.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    seg.add_argument("--dtype", default="auto", help="auto (bf16 autocast on CUDA), float32, bfloat16, float16")
    seg.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    seg.add_argument("--server", help="segment on a 'medsam3 serve' server at this URL instead of locally "
                                      "(the server's model is used)")
    seg.add_argument("--token-file", type=Path, help="--server: file holding the access token "
                                                     "(default: $MEDSAM3_TOKEN)")

    srv = sub.add_parser("serve", help="run the inference server (HTTP job API for Slicer and remote clients)",
                         description="Serve one model over HTTP (FastAPI + uvicorn). Listening on anything but "
                                     "127.0.0.1 requires an access token; see the README, 'Run on a GPU server'.")
    srv.add_argument("-m", "--model", help="model folder or hub id (default: $MEDSAM3_MODEL, else the demo model)")
    srv.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1, this computer only)")
    srv.add_argument("--port", type=int, default=8765, help="TCP port (default 8765; 0 picks a free one)")
    srv.add_argument("--token-file", type=Path, help="file whose first line is the access token "
                                                     "(default: $MEDSAM3_TOKEN); required off loopback")
    srv.add_argument("--ssl-certfile", help="TLS certificate (PEM); serve https")
    srv.add_argument("--ssl-keyfile", help="TLS private key (PEM)")
    srv.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    srv.add_argument("--devices", type=lambda text: tuple(d.strip() for d in text.split(",") if d.strip()),
                     default=(), metavar="DEV,DEV,...",
                     help="one worker per device, each with its own copy of the model, behind one queue "
                          "(e.g. cuda:0,cuda:1,cuda:2,cuda:3)")
    srv.add_argument("--dtype", default="auto", help="auto (bf16 autocast on CUDA), float32, bfloat16, float16")
    srv.add_argument("--queue-size", type=int, default=8, help="jobs that may wait (more get HTTP 429; default 8)")
    srv.add_argument("--result-ttl", type=float, default=3600.0, help="seconds a finished result is kept (default 3600)")
    srv.add_argument("--max-sessions", type=int, default=4,
                     help="interactive sessions (a volume held for clicks and corrections) open at once; more get "
                          "HTTP 503 (default 4; 0: none)")
    srv.add_argument("--session-ttl", type=float, default=900.0,
                     help="seconds a session may stay idle before it is closed (default 900)")
    srv.add_argument("--session-cache-mb", type=float, default=1024.0,
                     help="slice features one session keeps, on the model's device, in MB (default 1024)")
    srv.add_argument("--max-body-mb", type=float, default=1024.0, help="largest accepted upload in MB (default 1024)")
    srv.add_argument("--max-voxels", type=int, default=1024 ** 3, help="largest accepted volume in voxels")
    srv.add_argument("--max-dim", type=int, default=4096, help="largest accepted size along one axis")
    srv.add_argument("--header-timeout", type=float, default=10.0,
                     help="seconds a client gets to send its request headers, and as many for a TLS handshake "
                          "(default 10)")
    srv.add_argument("--keep-alive-timeout", type=float, default=5.0,
                     help="seconds an idle kept-alive connection stays open (default 5)")
    srv.add_argument("--max-connections", type=int, default=100,
                     help="open connections; above it, the one waiting longest for a request is closed (default 100)")
    srv.add_argument("--port-file", type=Path, help="once listening, write the port to this file (with --port 0: "
                                                    "how a program that starts the server learns the port)")
    srv.add_argument("--exit-on-stdin-eof", action="store_true",
                     help="stop when standard input closes (a parent program, e.g. 3D Slicer, that ends or "
                          "crashes takes its server with it)")

    from .evaluation.evaluate import add_evaluate_parser

    add_evaluate_parser(sub)

    tok = sub.add_parser("token", help="write a new random access token to a file (owner-readable only)")
    tok.add_argument("output", type=Path)

    conv = sub.add_parser("convert", help="convert an original SAM3 / Medical SAM3 .pt checkpoint (optionally with a "
                                          "MedSAM3 LoRA adapter) to a transformers model folder",
                          description="Convert Meta-layout SAM3 weights (sam3.pt, Medical SAM3 2D/3D) to a folder that "
                                      "--model accepts (config, safetensors, tokenizer). Strict: unknown or missing "
                                      "weights are an error. Checkpoints are read weights-only.")
    conv.add_argument("input", type=Path, help="checkpoint .pt (or a LoRA adapter .pt, merged into --base)")
    conv.add_argument("output", type=Path, help="new folder to write")
    conv.add_argument("--lora", type=Path, help="LoRA adapter .pt to merge into the input (W + alpha/r * B A)")
    conv.add_argument("--lora-alpha", type=float, default=32.0, help="LoRA alpha (default 32, MedSAM3 v1; r is read "
                                                                     "from the adapter)")
    conv.add_argument("--base", help="when the input is a LoRA adapter: the base checkpoint .pt or a hub id whose "
                                     "sam3.pt to use (default facebook/sam3)")
    conv.add_argument("--image-size", type=int, help="override the input resolution read from the checkpoint")
    conv.add_argument("--bpe", type=Path, help="CLIP bpe_simple_vocab_16e6.txt.gz (default: from an installed "
                                               "open_clip_torch, or $MEDSAM3_CLIP_BPE)")

    words = sub.add_parser("prompts", help="list the prompt dictionary by category: names, SNOMED CT codes, synonyms")
    words.add_argument("--search", metavar="WORD",
                       help="only the concepts whose name or a synonym contains WORD, or is spelt like it")
    tiny = sub.add_parser("make-tiny-model", help="write a tiny RANDOM-WEIGHT SAM3 model (tests, smoke runs)")
    tiny.add_argument("output", type=Path)
    tiny.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    previous = None
    if args.command == "segment" and threading.current_thread() is threading.main_thread():
        # SIGTERM (a scheduler's kill, a closed terminal) cleans up like Ctrl-C: nothing partial is left
        previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        return _run(args)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING, format="medsam3: %(levelname)s: %(message)s")
    logging.getLogger("urllib3").setLevel(logging.ERROR)  # its retry warnings; our errors say what failed
    try:
        if args.command == "segment":
            return _segment(args)
        if args.command == "serve":
            return _serve(args)
        if args.command == "evaluate":
            from .evaluation.evaluate import run_evaluate

            return run_evaluate(args)
        if args.command == "token":
            from .serving.serve import write_token

            write_token(args.output)
            print(f"wrote a new access token to {args.output}; give it to 'medsam3 serve --token-file' and to "
                  "the clients (Slicer: Compute > Remote > token)")
            return 0
        if args.command == "convert":
            from .inference.convert import convert_checkpoint

            out = convert_checkpoint(args.input, args.output, lora=args.lora, base=args.base,
                                     lora_alpha=args.lora_alpha, image_size=args.image_size, bpe=args.bpe)
            print(f"wrote {out}; use it with: medsam3 segment CT.nii.gz -p liver --model {out}")
            return 0
        if args.command == "prompts":
            return _list_prompts(args.search)
        if args.command == "make-tiny-model":
            from .imaging.outputs import check_output_folder
            from .inference.tiny import build_tiny_model

            check_output_folder(args.output)
            print(build_tiny_model(args.output, seed=args.seed))
            return 0
    except MedSAM3Error as error:
        print(f"medsam3: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("medsam3: cancelled; no output written", file=sys.stderr)
        return 130
    return 2


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _segment(args: argparse.Namespace) -> int:
    from .batch import is_batch_input
    from .imaging.io import read_volume
    from .imaging.outputs import OutputPaths, check_writable, write_result

    if any(not text.strip() for text in args.prompt):
        raise InputError("empty prompt: give a structure name such as 'liver'")
    prompts = [p for text in args.prompt for p in split_prompt_text(text)]
    default_dictionary().resolve_all(prompts)  # refuse bad prompts before any heavy work
    from .inference.merging import label_capacity

    if len(prompts) > label_capacity(np.dtype(args.label_type)):
        raise InputError(f"{len(prompts)} prompts do not fit a {args.label_type} label map (at most "
                         f"{label_capacity(np.dtype(args.label_type))}); use --label-type uint16")
    if args.dicom_seg:
        from .imaging.dicom_seg import require_highdicom

        require_highdicom()
    if args.server and args.model:
        raise InputError("--model and --server exclude each other: the server segments with the model it was "
                         "started with")
    batch = args.output_dir is not None or is_batch_input(args.input)
    if batch and args.output is not None:
        raise InputError(f"{args.input} is a batch (a folder of volumes, a CSV list or a dataset JSON): give "
                         "--output-dir for its outputs, not -o")
    if args.resume and not batch:
        raise InputError("--resume is for a batch (a folder of volumes, a CSV list or a dataset JSON with --output-dir)")
    options = _options(args)
    if batch:
        return _segment_batch(args, prompts, options)
    output = args.output or _output_default(args.input)
    paths = OutputPaths.beside(output, seg_nrrd=args.seg_nrrd, overlay=args.overlay, dicom_seg=args.dicom_seg)
    check_writable(paths, args.overwrite, inputs=[args.input])  # names and folders, before the input is read
    volume = read_volume(args.input, series=args.series)
    _check_case(args, paths, volume, args.input, prompts)  # room for the outputs, DICOM SEG references
    segment = _engine(args, prompts, options, args.device)
    result = segment(volume, _progress_bar(args.quiet, segment.device, args.server))
    write_result(result, paths, volume)
    _print_summary(result, paths)
    return 0


def _options(args: argparse.Namespace):
    from .common.options import SegmentOptions

    options = SegmentOptions(mode=args.mode, score_threshold=args.threshold, mask_threshold=args.mask_threshold,
                             new_object_threshold=args.new_object_threshold, instances=args.instances,
                             shared_anchor=args.shared_anchor, clip_length=args.clip_length,
                             window=args.window, modality=args.modality, slice_axis=args.slice_axis,
                             batch_size=args.batch_size, min_component_voxels=args.min_component_voxels,
                             fill_holes=args.fill_holes, largest_component=args.largest_component,
                             label_dtype=args.label_type)
    options.validate()
    return options


def _check_case(args: argparse.Namespace, paths, volume, source: Path, prompts: list[str]) -> None:
    """What can be refused once the input is read and before the model runs: room for the outputs
    (their size is known now) and, for a DICOM SEG, a DICOM series with the UIDs it references."""
    from .imaging.outputs import check_writable, output_bytes

    check_writable(paths, args.overwrite, inputs=[source],
                   needed_bytes=output_bytes(paths, volume.shape, np.dtype(args.label_type),
                                             default_dictionary().most_labels(prompts)))
    if args.dicom_seg:
        if not volume.dicom_files:
            raise InputError(f"--dicom-seg needs a DICOM series as input (a folder of slices): a DICOM SEG references "
                             f"the series it segments; {source} is not one")
        from .imaging.dicom_seg import read_series_headers

        read_series_headers(volume.dicom_files)  # a series a SEG cannot reference is refused before the model runs


def _engine(args: argparse.Namespace, prompts: list[str], options, device: str):
    """``segment(volume, progress) -> result`` with the model (loaded once) or the server of
    ``args``; its ``device`` attribute names where it computes."""
    if args.server:
        from .common.client import Client
        from .serving.serve import read_token

        client = Client(args.server, token=read_token(args.token_file))
        info = client.info()
        print(f"medsam3: segmenting on {args.server} with model {info.get('model_id')} "
              f"({info.get('device')})", file=sys.stderr)

        def segment(volume, progress=None):
            result = client.segment(volume, prompts, options, progress=progress)
            for warning in result.warnings:  # the server's engine logged them there; say them here
                print(f"medsam3: warning: {warning}", file=sys.stderr)
            return result

        segment.device = info.get("device")
        return segment
    model_source = args.model or default_model()
    if not args.model:
        print(f"medsam3: using the default model {model_source}", file=sys.stderr)
    from .inference.engine import Segmenter
    from .inference.models import load_model

    model = load_model(model_source, device=device, dtype=args.dtype)
    segmenter = Segmenter(model)

    def segment(volume, progress=None):
        return segmenter.segment(volume, prompts, options, progress=progress)

    segment.device = str(model.device)
    return segment


def _segment_batch(args: argparse.Namespace, prompts: list[str], options) -> int:
    """Many volumes, one model load (see :mod:`MedicalSAM3Core.batch`); exit 1 if a case failed."""
    from .batch import SUMMARY, Ranks, list_cases, shard
    from .imaging.outputs import LABEL_MAP_FORMATS, check_output_folder

    if args.output_dir is None:
        raise InputError(f"{args.input} is a batch (a folder of volumes, a CSV list or a dataset JSON): give "
                         "--output-dir for its outputs")
    if args.series:
        raise InputError("--series picks a series of one DICOM folder; in a batch CSV give a 'series' column")
    extension = args.label_format if args.label_format.startswith(".") else f".{args.label_format}"
    if extension not in LABEL_MAP_FORMATS:
        raise InputError(f"--label-format {args.label_format!r}: choose one of {', '.join(LABEL_MAP_FORMATS)}")
    cases = list_cases(args.input)
    summary = args.output_dir / SUMMARY
    if summary.exists() and not (args.overwrite or args.resume):
        raise InputError(f"{summary} exists (an earlier batch): --resume to go on with it, --overwrite to redo it")
    ranks = Ranks.from_environment()
    mine = shard(cases, ranks.rank, ranks.world)
    if ranks.rank == 0:
        check_output_folder(args.output_dir)
    ranks.start()
    completed = False
    try:
        code = _run_shard(args, prompts, options, cases, mine, ranks, summary, extension)
        completed = True
        return code
    finally:
        ranks.finish(completed)


def _run_shard(args: argparse.Namespace, prompts: list[str], options, cases, mine, ranks, summary: Path,
               extension: str) -> int:
    """This rank's cases, then (rank 0) the summary of every rank's; 1 if any case failed anywhere."""
    from .batch import merge, run_cases, summary_csv
    from .imaging.io import read_volume, staged_file
    from .imaging.outputs import OutputPaths, write_result

    prefix = f"medsam3 [rank {ranks.rank}/{ranks.world}]" if ranks.world > 1 else "medsam3"
    print(f"{prefix}: {len(mine)} of {len(cases)} cases from {args.input}", file=sys.stderr)
    segment = _engine(args, prompts, options, ranks.device(args.device))

    def paths_of(case):
        return OutputPaths.beside(args.output_dir / f"{case.id}{extension}", seg_nrrd=args.seg_nrrd,
                                  overlay=args.overlay, dicom_seg=args.dicom_seg)

    def segment_case(case):
        paths = paths_of(case)
        volume = read_volume(case.path, series=case.series)
        _check_case(args, paths, volume, case.path, prompts)
        result = segment(volume, _progress_bar(args.quiet, segment.device, args.server))
        write_result(result, paths, volume)
        return result

    def on_case(index, total, row):
        detail = f": {row.error}" if row.error else ""
        print(f"{prefix}: case {index + 1}/{total} {row.case} {row.status} in {row.seconds:.1f} s{detail}",
              file=sys.stderr)

    rows = run_cases(mine, segment_case, paths_of, args.resume, on_case)
    everyone = merge(cases, ranks.gather(rows))
    if ranks.rank == 0:
        with staged_file(summary) as tmp:
            tmp.write_text(summary_csv(everyone), encoding="utf-8")
            os.replace(tmp, summary)
        failed = [row.case for row in everyone if row.status == "failed"]
        print(f"wrote {summary}: {len(everyone) - len(failed)} of {len(everyone)} cases done"
              + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if any(row.status == "failed" for row in everyone) else 0


def _serve(args: argparse.Namespace) -> int:
    from .common.wire import Limits
    from .serving.app import ServerConfig
    from .serving.serve import (ConnectionLimits, ServeSettings, build_server, check_settings, read_token,
                                settings_warnings)

    logging.getLogger("medsam3.server").setLevel(logging.INFO)
    config = ServerConfig(token=read_token(args.token_file), max_body_bytes=int(args.max_body_mb * 1024 * 1024),
                          limits=Limits(max_voxels=args.max_voxels, max_dim=args.max_dim),
                          queue_size=args.queue_size, result_ttl=args.result_ttl, max_sessions=args.max_sessions,
                          session_ttl=args.session_ttl, session_cache_mb=args.session_cache_mb)
    settings = ServeSettings(model=args.model or "", host=args.host, port=args.port, device=args.device,
                             devices=args.devices, dtype=args.dtype, ssl_certfile=args.ssl_certfile, ssl_keyfile=args.ssl_keyfile,
                             config=config, connections=ConnectionLimits(header_timeout=args.header_timeout,
                                                                         keep_alive_timeout=args.keep_alive_timeout,
                                                                         max_connections=args.max_connections))
    check_settings(settings)  # refuse unsafe settings before loading a model
    for warning in settings_warnings(settings, args.token_file):
        print(f"medsam3: warning: {warning}", file=sys.stderr)
    if args.queue_size < 1:
        raise InputError("--queue-size must be at least 1")
    settings.model = args.model or default_model()
    server = build_server(settings)
    scheme = "https" if args.ssl_certfile else "http"
    print(f"medsam3: serving {settings.model} on {scheme}://{args.host}:{args.port} "
          f"({'token required' if config.token else 'no token: this computer only'}); Ctrl-C stops",
          file=sys.stderr)
    from .serving.serve import exit_on_stdin_eof, write_port_when_listening

    if args.port_file:
        write_port_when_listening(server, args.port_file)
    if args.exit_on_stdin_eof:
        exit_on_stdin_eof(server)
    server.run()
    return 0


def _progress_bar(quiet: bool, device: Optional[str] = None, server: Optional[str] = None):
    """A progress bar on stderr; the first estimate of the time left is printed once (with the hint to
    use a GPU server when a CPU run will be long)."""
    if quiet:
        return None
    from tqdm import tqdm

    from .common.progress import eta_message

    state: dict = {}

    def update(event) -> None:
        if event.total <= 0:  # e.g. a job still queued on a server: nothing to count yet
            return
        if event.eta_s is not None and not state.get("estimated"):
            state["estimated"] = True
            tqdm.write(f"medsam3: {eta_message(event.eta_s, device, server)}", file=sys.stderr)
        bar = state.get("bar")
        if bar is None:
            bar = state["bar"] = tqdm(total=event.total, unit="slice", file=sys.stderr, leave=False)
        if bar.total != event.total:
            bar.total = event.total
        bar.set_description(event.stage)
        bar.update(event.done - bar.n)
        if event.done >= event.total:
            bar.close()

    return update


def _list_prompts(search: Optional[str]) -> int:
    """``medsam3 prompts``: the dictionary's concepts grouped by category, each with its SNOMED CT
    type (laterality modifier and region where it has them), synonyms, parts (a paired structure)
    and TotalSegmentator class names; ``search`` keeps the matches of :meth:`PromptDictionary.search`."""
    dictionary = default_dictionary()
    concepts = dictionary.concepts if search is None else dictionary.search(search)
    if not concepts:
        print(f"no concept of the prompt dictionary matches {search!r}; as a prompt it is sent to the model as "
              "free text (SAM3 is open-vocabulary), with a warning")
        return 0
    by_category: dict[str, list] = {}
    for concept in concepts:
        by_category.setdefault(concept.category.meaning, []).append(concept)
    for category, members in by_category.items():
        print(category)
        for concept in members:
            extra = [", ".join(concept.synonyms)] if concept.synonyms else []
            if concept.parts:
                extra.append(f"parts: {' + '.join(concept.parts)}")
            if concept.totalsegmentator:
                extra.append(f"TotalSegmentator: {', '.join(concept.totalsegmentator)}")
            print(f"  {concept.name:24s} {_code_text(concept):40s} {'; '.join(extra)}")
    if search is None:
        print(f"{len(concepts)} concepts. A paired structure is sent as its parts to a model that does not know it "
              "as a whole. medsam3 prompts --search WORD shows one.")
    return 0


def _code_text(concept) -> str:
    """``SCT 64033007 Kidney + Left`` (``, in Brain`` where the concept has a region)."""
    kind = concept.type
    text = f"{kind.scheme} {kind.code} {kind.meaning}"
    if kind.modifier is not None:
        text += f" + {kind.modifier.meaning}"
    if concept.region is not None:
        text += f", in {concept.region.meaning}"
        if concept.region.modifier is not None:
            text += f" + {concept.region.modifier.meaning}"
    return text


def _print_summary(result, paths) -> None:
    print(f"{'value':>5}  {'name':24s} {'confidence':>10} {'voxels':>10} {'volume ml':>10}")
    for label in result.labels:
        print(f"{label.value:5d}  {label.name:24s} {label.confidence:10.3f} {label.voxel_count:10d} {label.volume_ml:10.2f}")
    for path in paths.all():
        print(f"wrote {path}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
