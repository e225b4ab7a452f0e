"""Green-list watermark (Kirchenbauer et al. 2023) through transformers' own
`WatermarkingConfig` / `WatermarkDetector`, with a key that belongs to the user.

transformers' default `hashing_key` (15485863, the millionth prime) is public: anyone could
"detect" or forge text watermarked with it. So a key is drawn with `secrets` on first use and
saved (mode 0600) in a small JSON file next to the outputs, together with every setting the
detector needs (ratio, bias, seeding scheme, context width). The file is never overwritten:
a second run reuses it, so all answers of one deployment carry the same key.
"""

from __future__ import annotations

import json
import os
import secrets
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from lora_alpaca.errors import UsageError

KEY_FILE_NAME = "watermark_key.json"
LIBRARY_PUBLIC_KEY = 15485863  # transformers' default hashing_key: public, so never our default
SEEDING_SCHEMES = ("lefthash", "selfhash")
# torch.Generator.manual_seed takes seeds below 2**64; the processor multiplies the key by a
# token id (< 2**18 for today's vocabularies) and reduces mod 2**64 - 1, so any 63-bit key works.
KEY_BITS = 63


@dataclass(frozen=True)
class WatermarkSettings:
    """Everything generation and detection must agree on (besides the tokenizer)."""

    hashing_key: int
    greenlist_ratio: float = 0.25
    bias: float = 2.0
    seeding_scheme: str = "lefthash"
    context_width: int = 1

    def validate(self) -> WatermarkSettings:
        if not 0 < self.greenlist_ratio < 1:
            raise UsageError(
                f"--watermark_greenlist_ratio {self.greenlist_ratio}: must be in (0, 1)"
            )
        if not self.bias > 0:
            raise UsageError(f"--watermark_bias {self.bias}: must be > 0")
        if self.seeding_scheme not in SEEDING_SCHEMES:
            raise UsageError(
                f"--watermark_seeding_scheme {self.seeding_scheme!r}: allowed: "
                + ", ".join(SEEDING_SCHEMES)
            )
        if self.context_width < 1:
            raise UsageError(f"--watermark_context_width {self.context_width}: must be >= 1")
        if not 0 <= self.hashing_key < 2**64:
            raise UsageError(f"--watermark_key {self.hashing_key}: must be in [0, 2**64)")
        return self

    def transformers_config(self):
        from transformers import WatermarkingConfig

        return WatermarkingConfig(**asdict(self))


def read_key_file(path: Path) -> WatermarkSettings:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        return WatermarkSettings(**{k: data[k] for k in WatermarkSettings.__dataclass_fields__})
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise UsageError(
            f"--watermark_key_file {path}: not a watermark key file ({type(e).__name__}: {e})"
        ) from None


def write_new_key_file(path: Path, settings: WatermarkSettings) -> None:
    """Create the key file, refusing to replace one (O_EXCL), readable by the owner only."""
    text = json.dumps(
        {
            **asdict(settings),
            "note": "secret: anyone with it can forge or strip "
            "the watermark; give it to whoever must run the detector",
        },
        indent=2,
    )
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise UsageError(f"--watermark_key_file {path}: already exists") from None
    except OSError as e:
        raise UsageError(f"--watermark_key_file {path}: cannot create ({e.strerror})") from None
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def default_key_file(output_file: str | None, lora_weights: str | None) -> Path:
    """Beside the outputs: the --output_file's folder, else the adapter folder, else here."""
    if output_file:
        return Path(output_file).resolve().parent / KEY_FILE_NAME
    if lora_weights:
        return Path(lora_weights) / KEY_FILE_NAME
    return Path.cwd() / KEY_FILE_NAME


def resolve_settings(
    key: int | None,
    key_file: Path,
    ratio: float,
    bias: float,
    scheme: str,
    width: int,
    create: bool,
) -> tuple[WatermarkSettings, str]:
    """(settings, where the key came from). A given --watermark_key wins; else the key file;
    else (when `create`) a fresh secret key written to the key file."""
    if key is not None:
        s = WatermarkSettings(key, ratio, bias, scheme, width).validate()
        where = "--watermark_key"
        if key == LIBRARY_PUBLIC_KEY:
            where += " (transformers' public default key: anyone can detect or forge it)"
        return s, where
    if key_file.is_file():
        return read_key_file(key_file).validate(), str(key_file)
    if not create:
        raise UsageError(
            f"--watermark_key_file {key_file}: not found; give --watermark_key INT or the key "
            "file written when the text was generated"
        )
    s = WatermarkSettings(secrets.randbits(KEY_BITS), ratio, bias, scheme, width).validate()
    write_new_key_file(key_file, s)
    print(f"[watermark] new secret key saved to {key_file} (keep it)", file=sys.stderr)
    return s, f"{key_file} (new)"
