"""What ``shardkit validate`` finds: findings with stable codes, gathered into a report.

Every code a finding can carry is listed in :data:`CODES` with its severity and meaning; scripts match on the
code, people read the message. The catalogue is also the table in the README.
"""

from __future__ import annotations

from dataclasses import dataclass, field

ERROR, WARNING = "error", "warning"

#: code -> (severity, meaning). File-level codes are the reader's :class:`~shardkit.errors.CheckpointError` codes.
CODES: dict[str, tuple[str, str]] = {
    # the index
    "index-invalid": (ERROR, "The index is not JSON, not an object, or has no weight_map of tensor names to file names."),
    "index-empty": (WARNING, "The index's weight_map names no tensor."),
    "index-format-mismatch": (
        ERROR,
        "The index's name says one format (model.safetensors.index.json) but it maps tensors to files of another.",
    ),
    "missing-shard": (ERROR, "The index names a file that is not there."),
    "path-escapes-folder": (ERROR, "The index names a path, or a file is a symlink, leading outside the checkpoint folder."),
    "index-key-missing": (ERROR, "The index maps a tensor to a file whose header does not hold it."),
    "index-key-unlisted": (ERROR, "A file holds a tensor that the index does not list (loaders driven by the index skip it)."),
    "duplicate-tensor": (ERROR, "The same tensor name is stored in two files."),
    "total-size-mismatch": (
        ERROR,
        "metadata.total_size differs from the sum of the tensors' bytes (shared tensors counted once).",
    ),
    "total-size-missing": (WARNING, "The index has no integer metadata.total_size."),
    "total-size-float": (WARNING, "metadata.total_size is a float (old transformers counted bools as 1/8 byte)."),
    # files: safetensors header rules (those of the reference Rust reader)
    "sf-too-small": (ERROR, "The file is shorter than the 8-byte header length."),
    "sf-header-too-large": (ERROR, "The header length is over 100 MB: a corrupt file or not safetensors at all."),
    "sf-header-past-eof": (ERROR, "The header length runs past the end of the file (truncated download?)."),
    "sf-header-not-utf8": (ERROR, "The header is not UTF-8."),
    "sf-header-json": (ERROR, "The header is not a JSON object."),
    "sf-bad-metadata": (ERROR, "__metadata__ is not a map of strings to strings."),
    "sf-bad-entry": (ERROR, "A tensor entry lacks a valid shape or data_offsets."),
    "sf-unknown-dtype": (ERROR, "A tensor has a dtype safetensors does not define."),
    "sf-size-mismatch": (ERROR, "A tensor's byte range does not match its dtype and shape."),
    "sf-offsets": (ERROR, "Tensor byte ranges leave a gap, overlap, or run backwards."),
    "sf-truncated": (ERROR, "The tensors need more bytes than the file holds: size != 8 + header + data (truncated download)."),
    "sf-trailing-bytes": (ERROR, "Bytes after the last tensor that no tensor covers: size != 8 + header + data."),
    # files: what they really are
    "lfs-pointer": (ERROR, "The file is a Git LFS pointer, not the weights: run `git lfs pull`."),
    "html-page": (ERROR, "The file is an HTML/XML page, typically an error page saved by a failed download."),
    "unknown-format": (ERROR, "A .bin/.pt file is neither a torch zip archive nor a legacy torch file."),
    "unsupported-format": (ERROR, "A tar-format torch file (pre-1.4), which shardkit does not read."),
    "missing-file": (ERROR, "The file does not exist."),
    "not-a-file": (ERROR, "The path is a folder where a file was expected."),
    "unreadable": (ERROR, "The file cannot be read (permissions, I/O error)."),
    # files: torch zip (.bin) through the restricted unpickler
    "zip-corrupt": (ERROR, "Not a readable zip archive (truncated download?)."),
    "zip-compressed": (ERROR, "A zip member is compressed; torch stores records uncompressed (a zip bomb is refused unread)."),
    "zip-truncated": (ERROR, "A zip member runs past the end of the file."),
    "not-torch-zip": (ERROR, "A zip archive without exactly one data.pkl: not a torch checkpoint."),
    "big-endian": (ERROR, "The checkpoint was saved big-endian."),
    "pickle-too-large": (ERROR, "data.pkl is over 256 MB."),
    "pickle-invalid": (ERROR, "data.pkl is not a valid torch pickle."),
    "unsafe-pickle": (ERROR, "The pickle references something outside the weights-only allow-list; nothing was executed."),
    "unsupported-tensor": (ERROR, "A quantized, sparse, nested or otherwise unsupported tensor."),
    "not-a-state-dict": (ERROR, "The file holds something other than a state dict of tensors."),
    "storage-missing": (ERROR, "A tensor's storage has no record in the archive."),
    "storage-size-mismatch": (ERROR, "A storage record's size differs from what the pickle declares."),
    "storage-too-short": (ERROR, "A tensor view reaches past the end of its storage."),
    "legacy-corrupt": (ERROR, "A legacy (pre-1.6) torch file that torch's weights-only loader cannot read."),
    "not-checked": (WARNING, "A file that could not be checked remotely (legacy torch format); download it to check."),
    # layout
    "shard-numbering": (ERROR, "Shard names disagree with the shard count (model-00003-of-00005 with another number of files)."),
    "stale-shard": (WARNING, "A shard file in the folder that the index does not use (left over from an earlier layout)."),
    "mixed-formats": (WARNING, "Both .bin and safetensors checkpoints of the same weights; loaders pick safetensors."),
    "file-too-large": (ERROR, "A file over the Hub's 50 GB per-file limit: reshard it."),
    "file-large": (WARNING, "A file over the Hub's 20 GB recommendation (loses CDN caching): consider resharding."),
    "unaligned-tensor": (
        WARNING,
        "Tensors whose file offset is not a multiple of their element size (no zero-copy typed views).",
    ),
    # --deep
    "nan-values": (ERROR, "A floating-point tensor holds NaN values."),
    "inf-values": (WARNING, "A floating-point tensor holds infinite values (legitimate in some masks)."),
    "all-zero": (WARNING, "A tensor is all zeros (a weight that was never trained or was lost?)."),
    "short-read": (ERROR, "Tensor data could not be read in full."),
    "checksum-mismatch": (ERROR, "A tensor's bytes differ from the --checksums manifest."),
    "checksum-missing": (ERROR, "A tensor in the --checksums manifest is not in the checkpoint."),
    "checksum-unlisted": (WARNING, "A tensor of the checkpoint is not in the --checksums manifest."),
    "checksums-invalid": (ERROR, "The --checksums manifest cannot be read."),
    "deep-skipped": (WARNING, "Tensor data was not checked (unsupported dtype, or a file that could not be opened)."),
    # --model-config
    "model-missing-key": (ERROR, "The model has a parameter the checkpoint lacks (it would keep random weights)."),
    "model-unexpected-key": (WARNING, "The checkpoint has a tensor the model does not use."),
    "model-shape-mismatch": (ERROR, "A tensor's shape differs from the model parameter's."),
    "model-missing-buffer": (WARNING, "The model has a persistent buffer the checkpoint lacks (it keeps its initial value)."),
    "model-not-checked": (WARNING, "The model could not be built from the config (transformers missing, unknown architecture)."),
}


@dataclass(frozen=True, slots=True)
class Finding:
    """One problem: a stable ``code``, its ``severity``, the ``file`` and ``tensor`` concerned, and a sentence."""

    code: str
    severity: str
    file: str | None
    tensor: str | None
    message: str

    def to_dict(self) -> dict:
        return {"code": self.code, "severity": self.severity, "file": self.file, "tensor": self.tensor, "message": self.message}


@dataclass(slots=True)
class Report:
    """Everything validation found about ``target``.

    ``verdict`` is ``"sound"`` (no finding), ``"sound-with-warnings"`` or ``"broken"`` (at least one error);
    ``bytes_downloaded`` counts the bytes of repository files fetched from a Hub (0 for local targets).
    """

    target: str
    findings: list[Finding] = field(default_factory=list)
    checkpoint: str | None = None  # the index or file that was validated, relative to the target
    files_checked: int = 0
    tensors_checked: int = 0
    bytes_downloaded: int = 0
    checksums_written: str | None = None
    checksums_matched: int | None = None  # tensors whose SHA-256 equals the --checksums manifest's

    def add(self, code: str, message: str, *, file: str | None = None, tensor: str | None = None) -> None:
        """Record a finding; its severity comes from :data:`CODES` (a code missing there counts as an error)."""
        severity = CODES.get(code, (ERROR, ""))[0]
        self.findings.append(Finding(code, severity, file, tensor, message))

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == ERROR]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == WARNING]

    @property
    def ok(self) -> bool:
        """True when no error was found (warnings allowed)."""
        return not self.errors

    @property
    def codes(self) -> set[str]:
        return {f.code for f in self.findings}

    @property
    def verdict(self) -> str:
        if self.errors:
            return "broken"
        return "sound-with-warnings" if self.warnings else "sound"

    def to_dict(self) -> dict:
        return {
            "target": self.target,
            "checkpoint": self.checkpoint,
            "verdict": self.verdict,
            "errors": len(self.errors),
            "warnings": len(self.warnings),
            "files_checked": self.files_checked,
            "tensors_checked": self.tensors_checked,
            "bytes_downloaded": self.bytes_downloaded,
            "checksums_written": self.checksums_written,
            "checksums_matched": self.checksums_matched,
            "findings": [f.to_dict() for f in self.findings],
        }
