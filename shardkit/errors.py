"""The exceptions shardkit raises, and the catalogue of every stable code they and ``validate`` carry.

Every error a user can cause with a bad file or a bad argument is a :class:`ShardkitError`. The CLI turns
it into one line on stderr and exit code 2; a traceback always means a bug in shardkit.

:data:`CATALOGUE` lists every code shardkit raises or reports, with its category, severity and meaning.
``tests/test_error_codes.py`` scans the source and fails on a code that is not in it; the README's codes table
is :func:`codes_table`'s output (``python scripts/codes_table.py --write`` rewrites it).
"""

from __future__ import annotations

import os
from typing import Literal, NamedTuple

Severity = Literal["error", "warning"]

#: Where a code comes from. The first five are what ``shardkit validate`` reports as findings (exit 1 when one
#: is an error, 0 with warnings only); "file" codes are also raised when any other command reads a bad file.
#: The rest are only raised as exceptions (one line on stderr, exit 2).
Category = Literal["index", "file", "layout", "deep", "model", "target", "hub", "usage", "output", "load"]
REPORTED_CATEGORIES: tuple[Category, ...] = ("index", "file", "layout", "deep", "model")


class CodeInfo(NamedTuple):
    """One catalogued code: its ``category``, its ``severity`` as a validate finding, and a one-line ``meaning``."""

    category: Category
    severity: Severity
    meaning: str

    @property
    def exit_code(self) -> str:
        """The CLI's exit status when this code is the outcome, as the README's table shows it."""
        if self.category not in REPORTED_CATEGORIES:
            return "2"
        reported = "1" if self.severity == "error" else "0"
        return f"{reported} (validate), 2 (other commands)" if self.category == "file" else reported


def _e(category: Category, meaning: str) -> CodeInfo:
    return CodeInfo(category, "error", meaning)


def _w(category: Category, meaning: str) -> CodeInfo:
    return CodeInfo(category, "warning", meaning)


#: Every stable code, in the README's order. Add a code here (one line) when you raise or report a new one,
#: then run ``python scripts/codes_table.py --write`` to refresh the README's table.
CATALOGUE: dict[str, CodeInfo] = {
    # the index (validate)
    "index-invalid": _e("index", "The index is not JSON, not an object, or has no weight_map of tensor names to file names."),
    "index-empty": _w("index", "The index's weight_map names no tensor."),
    "index-format-mismatch": _e(
        "index", "The index's name says one format (model.safetensors.index.json) but it maps tensors to files of another."
    ),
    "missing-shard": _e("index", "The index names a file that is not there."),
    "path-escapes-folder": _e("index", "The index names a path, or a file is a symlink, leading outside the checkpoint folder."),
    "index-key-missing": _e("index", "The index maps a tensor to a file whose header does not hold it."),
    "index-key-unlisted": _e(
        "index", "A file holds a tensor that the index does not list (loaders driven by the index skip it)."
    ),
    "duplicate-tensor": _e("index", "The same tensor name is stored in two files."),
    "total-size-mismatch": _e(
        "index", "metadata.total_size differs from the sum of the tensors' bytes (shared tensors counted once)."
    ),
    "total-size-missing": _w("index", "The index has no integer metadata.total_size."),
    "total-size-float": _w("index", "metadata.total_size is a float (old transformers counted bools as 1/8 byte)."),
    "total-size-unchecked": _w(
        "index", "metadata.total_size could not be compared: some files could not be read (see their errors)."
    ),
    # files: safetensors header rules (those of the reference Rust reader)
    "sf-too-small": _e("file", "The file is shorter than the 8-byte header length."),
    "sf-header-too-large": _e("file", "The header length is over 100 MB: a corrupt file or not safetensors at all."),
    "sf-header-past-eof": _e("file", "The header length runs past the end of the file (truncated download?)."),
    "sf-header-not-utf8": _e("file", "The header is not UTF-8."),
    "sf-header-json": _e("file", "The header is not a JSON object."),
    "sf-bad-metadata": _e("file", "__metadata__ is not a map of strings to strings."),
    "sf-bad-entry": _e("file", "A tensor entry lacks a valid shape or data_offsets."),
    "sf-unknown-dtype": _e("file", "A tensor has a dtype safetensors does not define."),
    "sf-size-mismatch": _e("file", "A tensor's byte range does not match its dtype and shape."),
    "sf-offsets": _e("file", "Tensor byte ranges leave a gap, overlap, or run backwards."),
    "sf-truncated": _e(
        "file", "The tensors need more bytes than the file holds: size != 8 + header + data (truncated download)."
    ),
    "sf-trailing-bytes": _e("file", "Bytes after the last tensor that no tensor covers: size != 8 + header + data."),
    # files: what they really are
    "lfs-pointer": _e("file", "The file is a Git LFS pointer, not the weights: run `git lfs pull`."),
    "html-page": _e("file", "The file is an HTML/XML page, typically an error page saved by a failed download."),
    "not-a-checkpoint": _e("file", "The file holds something other than a checkpoint."),
    "unknown-format": _e("file", "A .bin/.pt file is neither a torch zip archive nor a legacy torch file."),
    "unsupported-format": _e("file", "A tar-format torch file (pre-1.4), which shardkit does not read."),
    "missing-file": _e("file", "The file does not exist."),
    "not-a-file": _e("file", "The path is a folder where a file was expected."),
    "unreadable": _e("file", "The file cannot be read (permissions, I/O error)."),
    "short-read": _e("file", "Tensor data could not be read in full (the file ends early: truncated since it was opened?)."),
    # files: torch zip (.bin) through the restricted unpickler
    "zip-corrupt": _e("file", "Not a readable zip archive (truncated download?)."),
    "zip-compressed": _e("file", "A zip member is compressed; torch stores records uncompressed (a zip bomb is refused unread)."),
    "zip-truncated": _e("file", "A zip member runs past the end of the file."),
    "not-torch-zip": _e("file", "A zip archive without exactly one data.pkl: not a torch checkpoint."),
    "big-endian": _e("file", "The checkpoint was saved big-endian."),
    "pickle-too-large": _e("file", "data.pkl is over 256 MB."),
    "pickle-invalid": _e("file", "data.pkl is not a valid torch pickle."),
    "unsafe-pickle": _e("file", "The pickle references something outside the weights-only allow-list; nothing was executed."),
    "unsupported-tensor": _e("file", "A quantized, sparse, nested or otherwise unsupported tensor."),
    "not-a-state-dict": _e("file", "The file holds something other than a state dict of tensors."),
    "storage-missing": _e("file", "A tensor's storage has no record in the archive."),
    "storage-size-mismatch": _e("file", "A storage record's size differs from what the pickle declares."),
    "storage-too-short": _e("file", "A tensor view reaches past the end of its storage."),
    "legacy-corrupt": _e("file", "A legacy (pre-1.6) torch file that torch's weights-only loader cannot read."),
    "not-checked": _w("file", "A file that could not be checked remotely (legacy torch format); download it to check."),
    # DCP (torch.distributed.checkpoint) folders
    "dcp-metadata-missing": _e("file", "A DCP folder without its .metadata file (the .distcp files cannot be read without it)."),
    "dcp-metadata-invalid": _e("file", "The DCP .metadata is not a well-formed pickle of DCP's metadata classes."),
    "dcp-file-missing": _e("file", "A .distcp file that .metadata stores chunks in is missing."),
    "dcp-truncated": _e("file", "A chunk's byte range runs past the end of its .distcp file (truncated copy?)."),
    "dcp-chunk-missing": _e("file", "A tensor chunk or bytes item that .metadata lists has no storage record."),
    "dcp-chunk-invalid": _e("file", "A chunk's bytes are neither a torch.save archive nor part of a safetensors blob."),
    "dcp-chunk-mismatch": _e("file", "A chunk's stored dtype or shape differs from what .metadata declares."),
    "dcp-chunk-gap": _e("file", "A tensor's chunks leave part of it uncovered."),
    "dcp-chunk-overlap": _e("file", "Two chunks of a tensor cover the same elements."),
    "dcp-chunk-out-of-bounds": _e("file", "A chunk reaches outside its tensor's global shape."),
    "dcp-transformed": _e("file", "A chunk is stored through DCP stream transforms (compression), which shardkit does not read."),
    # layout (validate)
    "shard-numbering": _e(
        "layout", "Shard names disagree with the shard count (model-00003-of-00005 with another number of files)."
    ),
    "stale-shard": _w("layout", "A shard file in the folder that the index does not use (left over from an earlier layout)."),
    "mixed-formats": _w("layout", "Both .bin and safetensors checkpoints of the same weights; loaders pick safetensors."),
    "file-too-large": _e("layout", "A file over the Hub's 50 GB per-file limit: reshard it."),
    "file-large": _w("layout", "A file over the Hub's 20 GB recommendation (loses CDN caching): consider resharding."),
    "unaligned-tensor": _w(
        "layout", "Tensors whose file offset is not a multiple of their element size (no zero-copy typed views)."
    ),
    # validate --deep and --checksums
    "nan-values": _e("deep", "A floating-point tensor holds NaN values."),
    "inf-values": _w("deep", "A floating-point tensor holds infinite values (legitimate in some masks)."),
    "all-zero": _w("deep", "A tensor is all zeros (a weight that was never trained or was lost?)."),
    "checksum-mismatch": _e("deep", "A tensor's bytes differ from the --checksums manifest."),
    "hub-mismatch": _e("deep", "validate --against: a file's size or SHA-256 differs from the Hub repo's (LFS object id)."),
    "hub-missing": _w("deep", "validate --against: a local checkpoint file that the Hub repo does not have."),
    "local-missing": _w("deep", "validate --against: a checkpoint file of the Hub repo that the folder does not have."),
    "blob-mismatch": _e(
        "deep", "validate --verify-blobs: a cache file's bytes do not hash to its blob's name (corrupt download)."
    ),
    "checksum-missing": _e("deep", "A tensor in the --checksums manifest is not in the checkpoint."),
    "checksum-unlisted": _w("deep", "A tensor of the checkpoint is not in the --checksums manifest."),
    "checksums-invalid": _e("deep", "The --checksums manifest cannot be read."),
    "deep-skipped": _w("deep", "Tensor data was not checked (unsupported dtype, or a file that could not be opened)."),
    "nothing-checked": _e(
        "layout", "The check read nothing (no file could be opened, or --deep/--checksums read no tensor): never sound."
    ),
    # validate --model-config
    "model-missing-key": _e("model", "The model has a parameter the checkpoint lacks (it would keep random weights)."),
    "model-unexpected-key": _w("model", "The checkpoint has a tensor the model does not use."),
    "model-shape-mismatch": _e("model", "A tensor's shape differs from the model parameter's."),
    "model-missing-buffer": _w("model", "The model has a persistent buffer the checkpoint lacks (it keeps its initial value)."),
    "tied-head-differs": _e(
        "model", "config.json ties the LM head to the input embeddings, but the checkpoint's head holds other values."
    ),
    "tied-head-redundant": _w("model", "config.json ties the LM head, and the checkpoint stores it again as an identical copy."),
    "untied-head-missing": _e("model", "config.json unties the LM head of a causal LM, but the checkpoint has no head."),
    "model-not-checked": _w(
        "model", "The model could not be built from the config (transformers missing, unknown architecture)."
    ),
    # the target as a whole (raised)
    "no-checkpoint": _e("target", "The folder or repo holds no checkpoint (no .safetensors, .bin or index file)."),
    "ambiguous": _e("target", "The folder or repo holds several checkpoints: pick one with --variant or a file path."),
    "error": _e("target", "An error of no more specific kind (the base class's code)."),
    # the Hub (raised)
    "hub-error": _e("hub", "A Hub repo that cannot be reached or read, for a reason no other code names."),
    "repo-not-found": _e("hub", "No such repo (or it is private and no token was given)."),
    "revision-not-found": _e("hub", "The repo has no such branch, tag or commit."),
    "repo-gated": _e("hub", "The repo is gated: accept its terms on the Hub, then pass a token."),
    "repo-access-denied": _e("hub", "The token has no access to the repo."),
    "hub-unreachable": _e("hub", "The Hub endpoint cannot be reached (network, DNS, proxy)."),
    "hub-offline": _e("hub", "HF_HUB_OFFLINE is set and the files are not in the local cache."),
    "hub-http-error": _e("hub", "The Hub answered with an HTTP error no other code names."),
    # shardkit push (the repo is unchanged after each)
    "push-invalid-checkpoint": _e("hub", "push: the folder's checkpoint has validation errors; fix them or pass --force."),
    "push-no-token": _e("hub", "push: no Hub token (--token, HF_TOKEN or `hf auth login`)."),
    "push-failed": _e("hub", "push: an upload or the commit failed (network, server); the repo is unchanged, a rerun resumes."),
    "push-conflict": _e("hub", "push: the branch moved while pushing; nothing was committed: rerun."),
    "push-too-large": _e("hub", "push: the checkpoint alone needs more than one commit holds: reshard into fewer files."),
    # arguments (raised)
    "usage": _e("usage", "A bad argument: an unparsable size, an unknown dtype or format, a destination that cannot be used."),
    # transforms while resharding (raised)
    "bad-option": _e("usage", "Transform options that cannot be combined or a value they do not take (--tie with --untie)."),
    "bad-pattern": _e("usage", "A malformed --select/--drop/--keep-dtype pattern, --rename rule or --strip-prefix."),
    "key-collision": _e("usage", "Key mapping sends two source tensors to one output name (both are named)."),
    "nothing-selected": _e("usage", "--select/--drop leave no tensor to write."),
    "no-config": _e("usage", "A transform needs the config.json beside the source (--dtype auto), which is missing or silent."),
    "experts-unknown-arch": _e("usage", "--experts on an architecture whose expert packing shardkit does not know (named)."),
    "experts-incomplete": _e("usage", "--experts: a MoE layer lacks an expert's projection, or a packed tensor its partner."),
    "experts-mismatch": _e("usage", "--experts: the experts of one layer differ in shape or dtype, or packed shapes disagree."),
    "experts-none": _e("usage", "--experts on a checkpoint holding no MoE expert tensors."),
    "no-fp8": _e("usage", "--dequantize on a checkpoint holding no FP8 tensors."),
    "fp8-no-scale": _e("usage", "--dequantize: an FP8 weight has no weight_scale_inv or weight_scale beside it."),
    "scale-shape": _e("usage", "--dequantize: a scale's shape does not fit its weight and block size (both tensors are named)."),
    "tie-not-configured": _e("usage", "--tie where config.json does not say tie_word_embeddings: true."),
    "tie-differs": _e("usage", "--tie where the LM head holds other values than the input embeddings (both are named)."),
    # writing (raised)
    "write-failed": _e("output", "Writing the output failed (full disk, permissions); nothing was left at the destination."),
    "verify-failed": _e("output", "The written files do not read back as planned; nothing was left at the destination."),
    # loading big models (raised)
    "missing-keys": _e("load", "The model has parameters the checkpoint does not hold (or still on the meta device)."),
    "unexpected-keys": _e("load", "The checkpoint holds tensors the model has no parameter or buffer for."),
    "shape-mismatch": _e("load", "A checkpoint tensor's shape differs from the model parameter's."),
    "offload-missing": _e("load", "The offload folder holds no offload index: load the checkpoint with it first."),
    "offload-changed": _e(
        "load", "An offloaded weights file or the source safetensors changed, vanished or was truncated since it was indexed."
    ),
    "gpu-oom": _e("load", "A block ran out of GPU memory during the forward; the model stays usable."),
}


def codes_table() -> str:
    """The README's codes table: one Markdown row per catalogued code, in catalogue order."""
    rows = ["| Code | Category | Severity | Exit | Meaning |", "|---|---|---|---|---|"]
    for code, info in CATALOGUE.items():
        rows.append(f"| `{code}` | {info.category} | {info.severity} | {info.exit_code} | {info.meaning} |")
    return "\n".join(rows) + "\n"


class ShardkitError(Exception):
    """Base class of every error shardkit raises on purpose.

    ``code`` is a short stable identifier (``"sf-header-too-large"``) that ``shardkit validate`` reports and
    scripts may match on; the message is for people.
    """

    code = "error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class CheckpointError(ShardkitError):
    """A checkpoint file, index or folder that cannot be read as what it claims to be."""

    code = "unreadable"

    def __init__(self, path: str | os.PathLike, problem: str, *, code: str | None = None) -> None:
        self.path = os.fspath(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}", code=code)


class NotACheckpointError(CheckpointError):
    """The file holds something else: a Git LFS pointer, an HTML page, an unknown format."""

    code = "not-a-checkpoint"


class UnsafePickleError(CheckpointError):
    """A pickle asked for a global outside the allow-list; nothing was imported or called."""

    code = "unsafe-pickle"


class UnsafePathError(CheckpointError):
    """An index or symlink points outside the checkpoint's folder."""

    code = "path-escapes-folder"


class UsageError(ShardkitError, ValueError):
    """A bad argument: an unparsable size, an unknown dtype, a destination that can't be used.

    Also a ``ValueError``, so callers written for accelerate (``except ValueError``) catch a bad device map or
    ``max_memory`` as they do there.
    """

    code = "usage"


class OutputError(ShardkitError):
    """Writing the output failed (full disk, permissions); nothing was left at the destination."""

    code = "write-failed"


class HubError(ShardkitError):
    """A Hub repo that can't be reached or read at all: missing, gated, no access, no network."""

    code = "hub-error"
