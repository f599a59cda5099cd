"""``cifar-classify``: classify image files and folders with a cifar-serve server.

Files (and ``.tar``/``.zip`` members) are read and decoded here, with the server's own decoding
(``decode_image``), and sent as packed batches: a file that cannot be read or decoded is reported
on stderr and skipped, without failing the batch it would have been part of; the next batch is
decoded while the server works on the current one.

``--output FILE`` appends rows to FILE a batch at a time, flushed before the next request, so a
run killed at any point leaves every row it received; ``--resume`` reads FILE back and skips the
images it names, so the finished FILE holds every image exactly once.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np
from tqdm import tqdm

from ._client import DEFAULT_ADDRESS, Client
from ._errors import CifarServeError
from ._inputs import decode_file_bytes
from ._sources import ARCHIVE_SUFFIXES, IMAGE_SUFFIXES, ImageSource, find_images
from ._types import Classification

__all__ = [
    "EXIT_FAILED",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_SKIPPED",
    "EXIT_USAGE",
    "IMAGE_SUFFIXES",
    "OUTPUT_FORMATS",
    "find_images",
    "main",
]

logger = logging.getLogger("cifar_serve.client.cli")

OUTPUT_FORMATS = {".csv": "csv", ".jsonl": "jsonl"}  # --output FILE's format, by its suffix
EXIT_OK = 0
EXIT_SKIPPED = 1
EXIT_USAGE = 2
EXIT_FAILED = 3
_PROGRESS_MIN_FILES = 100  # fewer files than this finish too fast for a progress bar to help
_LABEL_WIDTH = len("automobile")  # the longest CIFAR-10 class name
EXIT_INTERRUPTED = 130  # the shell's status for a process ended by Ctrl-C (128 + SIGINT)

_EPILOG = f"""\
Folders are searched for files ending in {", ".join(sorted(IMAGE_SUFFIXES))} (any case); files named
explicitly are tried whatever their suffix. Archives ({", ".join(ARCHIVE_SUFFIXES)}) named
explicitly give every member named like an image, at any depth, sorted by name; their rows name
them ARCHIVE/MEMBER. Files are decoded here, exactly as the server decodes them, and sent in
packed batches; a file that cannot be read or decoded is reported on stderr and skipped. Results
go to stdout as they arrive, one per file, in the order found (folders sorted by path); an
interrupted run keeps the rows it has written.

Long runs: --output FILE (.csv or .jsonl) appends the rows to FILE a batch at a time, each batch
flushed before the next is sent, so a run that is killed keeps every row it received. Run the
same command with --resume to continue it: the images FILE already names are skipped (a half-
written last row is dropped and redone), so the finished FILE has every image exactly once.
Without --resume, an existing FILE that holds rows is left alone and the run refused.

--server takes one server, several (comma-separated, used round-robin while they report SERVING;
a request a server never answered is retried on another), or dns:///NAME:PORT resolving to
several. A server without a port is on 50051.

With the server on this host, the pixels and logits pass through system shared memory (POSIX
objects under /dev/shm, Triton's extension) instead of the socket; the regions are unregistered
and removed on exit, Ctrl-C included. -v says which path was taken.

exit status:
  {EXIT_OK}  every image file found was classified
  {EXIT_SKIPPED}  some files were skipped (each reported on stderr); the others were classified and printed
  {EXIT_USAGE}  bad usage, or nothing could be classified (no image files found, or all were skipped)
  {EXIT_FAILED}  a call to the server failed (unreachable, timed out, refused); the rows written before stay
  {EXIT_INTERRUPTED}  interrupted (Ctrl-C); the rows written before stay (a JSON array is closed)

environment:
  CIFAR_SERVE_ADDRESS  default for --server ({DEFAULT_ADDRESS} when unset)
  CIFAR_SERVE_AUTH_TOKEN  default for --token, the variable cifar-serve reads its --auth-token from
                       (keeps the token out of the process list; CIFAR_SERVE_TOKEN is read too)
  CIFAR_SERVE_SHARED_MEMORY  default for --shared-memory (auto when unset)
"""


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _top_k(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 10:
        raise argparse.ArgumentTypeError(f"must be between 1 and 10, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cifar-classify",
        description="Classify image files and folders with a cifar-serve server (CIFAR-10 ResNet18).",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files and folders to classify")
    p.add_argument("-r", "--recursive", action="store_true", help="also search the subfolders of folders")
    p.add_argument(
        "-k",
        "--top-k",
        type=_top_k,
        default=1,
        metavar="K",
        help="ranked classes to report per image, 1..10 (default: 1)",
    )
    p.add_argument(
        "-f",
        "--format",
        choices=("table", "json", "jsonl", "csv"),
        default=None,
        help="output format on stdout (default: table); with --output, FILE's suffix decides",
    )
    p.add_argument(
        "-o",
        "--output",
        metavar="FILE",
        help="append the rows to FILE (.csv or .jsonl) instead of stdout, flushed per batch",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue --output FILE: skip the images it already names (a new FILE is started)",
    )
    p.add_argument("--logits", action="store_true", help="also output the 10 raw logits (json and csv)")
    p.add_argument(
        "-s",
        "--server",
        default=os.environ.get("CIFAR_SERVE_ADDRESS") or DEFAULT_ADDRESS,
        metavar="HOST[:PORT][,...]",
        help="server, several comma-separated, or dns:///NAME:PORT; port 50051 when left out "
        "(default: $CIFAR_SERVE_ADDRESS or %(default)s)",
    )
    p.add_argument(
        "--timeout",
        type=_positive_float,
        default=60.0,
        metavar="S",
        help="deadline of each batch request in seconds, retries included (default: %(default)s)",
    )
    p.add_argument(
        "--retries",
        type=int,
        default=3,
        metavar="N",
        help="retries of a batch when the server is unavailable (default: %(default)s)",
    )
    p.add_argument(
        "-b",
        "--batch-size",
        type=_positive_int,
        default=256,
        metavar="N",
        help="images per request (default: %(default)s; the server allows up to 1024)",
    )
    p.add_argument(
        "--shared-memory",
        choices=("auto", "on", "off"),
        default=os.environ.get("CIFAR_SERVE_SHARED_MEMORY") or "auto",
        help="pass pixels and logits through system shared memory instead of the socket: auto uses it "
        "when the server is on this host (loopback or unix socket) and accepts a region; on: fail "
        "if it cannot (default: $CIFAR_SERVE_SHARED_MEMORY or %(default)s)",
    )
    tls = p.add_argument_group("security")
    tls.add_argument("--tls", action="store_true", help="use TLS with the system's root certificates")
    tls.add_argument(
        "--tls-ca", metavar="FILE", help="CA certificate (PEM) to verify the server with; implies TLS"
    )
    tls.add_argument("--tls-cert", metavar="FILE", help="client certificate (PEM) for mutual TLS")
    tls.add_argument("--tls-key", metavar="FILE", help="client private key (PEM) for mutual TLS")
    tls.add_argument(
        "--tls-server-name",
        metavar="NAME",
        help="name to expect in the server's certificate, when it differs from HOST",
    )
    tls.add_argument(
        "--token",
        # The server's name for the same secret; the client's old name still works.
        default=os.environ.get("CIFAR_SERVE_AUTH_TOKEN") or os.environ.get("CIFAR_SERVE_TOKEN") or None,
        help="bearer token sent as 'authorization: Bearer TOKEN' (default: $CIFAR_SERVE_AUTH_TOKEN)",
    )
    p.add_argument(
        "--no-progress",
        action="store_true",
        help=f"no progress bar (it shows on a terminal for {_PROGRESS_MIN_FILES} files or more)",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log requests and retries on stderr")
    return p


def _has_subfolders(path: Path) -> bool:
    return path.is_dir() and any(p.is_dir() for p in path.iterdir())


@dataclass
class _Decoded:
    name: str
    image: np.ndarray | None
    error: str = ""


def _decode(source: ImageSource) -> _Decoded:
    try:
        data = source.read()
    except OSError as exc:
        return _Decoded(source.name, None, exc.strerror or str(exc))
    except Exception as exc:  # a damaged archive member (tarfile, zipfile, zlib each raise their own)
        return _Decoded(source.name, None, f"cannot read it from the archive ({exc})")
    try:
        return _Decoded(source.name, decode_file_bytes(data, source.name))
    except CifarServeError as exc:  # not decodable; the message names the file
        return _Decoded(source.name, None, exc.message.removeprefix(f"{source.name}: "))


def _batches(files: list[ImageSource], size: int, pool: ThreadPoolExecutor) -> Iterator[list[_Decoded]]:
    """Decoded batches in order; batch n+1 is being decoded while the caller works on batch n."""
    chunks = [files[i : i + size] for i in range(0, len(files), size)]
    pending: list[Future[_Decoded]] = [pool.submit(_decode, f) for f in chunks[0]] if chunks else []
    for n in range(len(chunks)):
        done = [fut.result() for fut in pending]
        pending = [pool.submit(_decode, f) for f in chunks[n + 1]] if n + 1 < len(chunks) else []
        yield done


def _row(name: str, result: Classification, logits: bool) -> dict[str, Any]:
    row: dict[str, Any] = {
        "path": name,
        "label": result.label,
        "class_index": result.class_index,
        "probability": result.probability,
        "predictions": [
            {"label": p.label, "class_index": p.class_index, "probability": p.probability}
            for p in result.predictions
        ],
    }
    if logits and result.logits is not None:
        row["logits"] = [float(v) for v in result.logits]
    return row


class _CtrlC:
    """Ctrl-C that waits for the output block in progress, so no row is ever cut in half.

    A SIGINT that arrives inside :meth:`held` raises KeyboardInterrupt as the block ends;
    elsewhere it raises at once, as Python's default handler does.
    """

    def __init__(self) -> None:
        self._holding = False
        self._pending = False

    def handler(self, signum: int, frame: object) -> None:
        if self._holding:
            self._pending = True
        else:
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        self._holding = True
        try:
            yield
        finally:
            self._holding = False
        if self._pending:
            self._pending = False
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield  # only the main thread may set handlers; then Ctrl-C is not ours to handle
            return
        previous = signal.signal(signal.SIGINT, self.handler)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)


def _csv_header(top_k: int, n_logits: int) -> list[str]:
    header = ["path", "label", "class_index", "probability"]
    for r in range(2, top_k + 1):
        header += [f"label_{r}", f"class_index_{r}", f"probability_{r}"]
    return header + [f"logit_{i}" for i in range(n_logits)]


class _Output:
    """Rows written as they arrive, a batch at a time, so an interrupted run keeps what it got.

    JSON is one array, opened at the first row and closed by :meth:`close` (also after Ctrl-C);
    JSON Lines is one object a line; CSV's header and the table's header come with the first
    batch (unless ``has_header``: a resumed file has one); the table's path column is as wide as
    the longest path found, so its rows line up without waiting for the others.
    """

    def __init__(
        self,
        out: TextIO,
        fmt: str,
        top_k: int,
        logits: bool,
        path_width: int,
        ctrl_c: _CtrlC,
        has_header: bool = False,
    ) -> None:
        self.out, self.fmt, self.top_k, self.logits, self.ctrl_c = out, fmt, top_k, logits, ctrl_c
        self.path_width = max(path_width, len("PATH"))
        self.has_header = has_header
        self.rows = 0

    def _header(self, first: dict[str, Any], buf: io.StringIO) -> None:
        if self.fmt == "json":
            buf.write("[\n")
        elif self.fmt == "csv":
            header = _csv_header(self.top_k, len(first.get("logits", ())))
            csv.writer(buf, lineterminator="\n").writerow(header)
        elif self.fmt == "jsonl":
            pass
        else:
            self._table_line(["PATH", "LABEL", "PROBABILITY"] + (["TOP-K"] if self.top_k > 1 else []), buf)

    def _table_line(self, cells: list[str], buf: io.StringIO) -> None:
        widths = [self.path_width, _LABEL_WIDTH, len("PROBABILITY")]
        line = "  ".join(cell.ljust(w) for cell, w in zip(cells, widths, strict=False))
        if len(cells) > len(widths):
            line += "  " + cells[-1]
        buf.write(line.rstrip() + "\n")

    def write(self, rows: list[dict[str, Any]]) -> None:
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        n = self.rows
        for row in rows:
            if n == 0 and not self.has_header:
                self._header(row, buf)
            if self.fmt == "jsonl":
                buf.write(json.dumps(row) + "\n")
            elif self.fmt == "json":
                text = json.dumps(row, indent=2)
                buf.write(("" if n == 0 else ",\n") + "  " + text.replace("\n", "\n  "))
            elif self.fmt == "csv":
                line: list[Any] = [row["path"], row["label"], row["class_index"], repr(row["probability"])]
                for p in row["predictions"][1 : self.top_k]:
                    line += [p["label"], p["class_index"], repr(p["probability"])]
                line += [repr(v) for v in row.get("logits", ())]
                writer.writerow(line)
            else:
                cells = [row["path"], row["label"], f"{row['probability']:.4f}"]
                if self.top_k > 1:
                    ranked = row["predictions"]
                    cells.append(", ".join(f"{p['label']} {p['probability']:.3f}" for p in ranked))
                self._table_line(cells, buf)
            n += 1
        with self.ctrl_c.held():
            self.out.write(buf.getvalue())
            self.out.flush()
            self.rows = n

    def close(self) -> None:
        with self.ctrl_c.held():
            if self.fmt == "json" and self.rows:
                self.out.write("\n]\n")
            self.out.flush()


class _UsageError(Exception):
    """Bad usage found after parsing (about --output FILE); the message says what to do."""


def _output_format(args: argparse.Namespace) -> str:
    if args.output is None:
        if args.resume:
            raise _UsageError("--resume continues an --output FILE: give one")
        return str(args.format or "table")
    suffix = Path(args.output).suffix.lower()
    fmt = OUTPUT_FORMATS.get(suffix)
    if fmt is None:
        raise _UsageError(f"--output {args.output}: name it .csv or .jsonl (its suffix sets the format)")
    if args.format is not None and args.format != fmt:
        raise _UsageError(f"--output {args.output} is written as {fmt}, not --format {args.format}")
    return fmt


def _drop_partial_row(path: Path) -> bytes:
    """FILE's complete lines; a last line without its newline (a run killed mid-write) is cut off."""
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        logger.info(
            "%s: dropping a half-written last row (%d bytes); it is done again", path, len(data) - end
        )
        with path.open("r+b") as f:
            f.truncate(end)
        data = data[:end]
    return data


def _rows_done(path: Path, fmt: str, top_k: int, logits: bool) -> tuple[set[str], bool]:
    """The names FILE already has rows for, and whether it has a CSV header; refuses a FILE
    written with other columns, which a resumed run would otherwise extend with mismatched rows."""
    text = _drop_partial_row(path).decode("utf-8")
    if not text:
        return set(), False
    other = f"{path} was written with other columns; resume with the --top-k and --logits it was started with"
    if fmt == "csv":
        table = list(csv.reader(io.StringIO(text)))
        header = table[0]
        n_logits = sum(1 for h in header if h.startswith("logit_"))
        if header != _csv_header(top_k, n_logits) or (n_logits > 0) != logits:
            raise _UsageError(other)
        return {row[0] for row in table[1:] if row}, True
    names: set[str] = set()
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            name = row["path"]
        except (ValueError, KeyError, TypeError):
            raise _UsageError(f"{path}:{number}: not a row cifar-classify wrote") from None
        if len(row.get("predictions", ())) != top_k or ("logits" in row) != logits:
            raise _UsageError(other)
        names.add(name)
    return names, False


def _bar_size() -> dict[str, int]:
    """Nothing (tqdm follows the terminal) unless the terminal reports a zero size, which hides the bar."""
    try:
        size = os.get_terminal_size(sys.stderr.fileno())
    except (OSError, ValueError):
        return {}
    return {} if size.columns and size.lines else {"ncols": size.columns or 80, "nrows": size.lines or 24}


def _say(message: str) -> None:
    """A message for the user on stderr that does not garble the progress bar."""
    tqdm.write(f"cifar-classify: {message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if bool(args.tls_cert) != bool(args.tls_key):
        parser.error("--tls-cert and --tls-key go together")
    try:
        fmt = _output_format(args)
    except _UsageError as exc:
        parser.error(str(exc))
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="cifar-classify: %(message)s")
    # -v is about our requests and retries; Pillow's decoder chatter (STREAM b'IHDR') is not.
    logging.getLogger("cifar_serve").setLevel(logging.DEBUG if args.verbose else logging.WARNING)

    with ExitStack() as stack:
        files, missing, archives = find_images(args.paths, args.recursive)
        for archive in archives:
            stack.callback(archive.close)
        for arg, reason in missing:
            _say(f"skipped {arg}: {reason}")
        if not files:
            nested = [] if args.recursive else [a for a in args.paths if _has_subfolders(Path(a))]
            hint = f"; {', '.join(nested)} has subfolders: add --recursive to search them" if nested else ""
            _say(f"no image files to classify{hint}")
            return EXIT_USAGE
        return _classify(args, fmt, files, len(missing), stack)


def _classify(
    args: argparse.Namespace, fmt: str, files: list[ImageSource], skipped: int, stack: ExitStack
) -> int:
    out: TextIO = sys.stdout
    out_path = Path(args.output) if args.output else None
    done: set[str] = set()
    has_header = False
    if out_path is not None:
        if out_path.is_file() and out_path.stat().st_size:
            if not args.resume:
                _say(f"error: {out_path} already holds rows: add --resume to continue it, or remove it")
                return EXIT_USAGE
            try:
                done, has_header = _rows_done(out_path, fmt, args.top_k, args.logits)
            except _UsageError as exc:
                _say(f"error: {exc}")
                return EXIT_USAGE
            except (OSError, UnicodeDecodeError) as exc:
                _say(f"error: cannot resume {out_path}: {exc}")
                return EXIT_USAGE
        try:
            out = stack.enter_context(out_path.open("a", encoding="utf-8", newline=""))
        except OSError as exc:
            _say(f"error: cannot write {out_path}: {exc.strerror or exc}")
            return EXIT_USAGE
    todo = [f for f in files if f.name not in done] if done else files
    if done:
        _say(
            f"resuming {out_path}: {len(files) - len(todo)} of {len(files)} image(s) done, {len(todo)} to go"
        )
    if not todo:
        _say(f"{out_path}: every image is there already")
        return EXIT_OK
    again = f"; run it again with --resume to continue {out_path}" if out_path is not None else ""

    show_bar = not args.no_progress and sys.stderr.isatty() and len(todo) >= _PROGRESS_MIN_FILES
    try:
        client = Client(
            args.server,
            timeout=args.timeout,
            retries=args.retries,
            tls=args.tls,
            root_certificates=args.tls_ca,
            client_cert=args.tls_cert,
            client_key=args.tls_key,
            server_name=args.tls_server_name,
            token=args.token,
            max_images_per_request=args.batch_size,
            shared_memory=args.shared_memory,
        )
    except (OSError, ValueError) as exc:
        _say(f"error: {exc}")
        return EXIT_USAGE
    ctrl_c = _CtrlC()
    width = max(len(f.name) for f in todo)
    output = _Output(out, fmt, args.top_k, args.logits, width, ctrl_c, has_header=has_header)
    size: dict[str, Any] = _bar_size() if show_bar else {}
    bar = tqdm(
        total=len(files),
        initial=len(files) - len(todo),
        unit="img",
        file=sys.stderr,
        disable=not show_bar,
        **size,
    )
    status = EXIT_OK
    try:
        with (
            ctrl_c.installed(),
            client,
            ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool,
            bar,
        ):
            for batch in _batches(todo, args.batch_size, pool):
                good = [d for d in batch if d.image is not None]
                for d in batch:
                    if d.image is None:
                        skipped += 1
                        _say(f"skipped {d.name}: {d.error}")
                if good:
                    try:
                        results = client.classify(
                            np.stack([d.image for d in good if d.image is not None]),
                            top_k=args.top_k,
                            include_logits=args.logits,
                        )
                    except CifarServeError as exc:
                        bar.close()
                        where = "" if client.address in exc.message else f"{client.address}: "
                        _say(f"error: {where}{exc}{again}")
                        status = EXIT_FAILED
                        break
                    output.write([_row(d.name, r, args.logits) for d, r in zip(good, results, strict=True)])
                bar.update(len(batch))
    except KeyboardInterrupt:
        bar.close()
        _say(f"interrupted: {output.rows} of {len(todo)} image(s) classified and written{again}")
        status = EXIT_INTERRUPTED
    except BrokenPipeError:  # e.g. piped into `head`: not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return status
    try:
        output.close()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    if out_path is not None:
        _say(f"{out_path}: {len(done) + output.rows} row(s), {output.rows} written by this run")
    if status != EXIT_OK:
        return status
    if not output.rows:
        _say("nothing could be classified")
        return EXIT_USAGE
    if skipped:
        _say(f"classified {output.rows} image(s), skipped {skipped}")
        return EXIT_SKIPPED
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
