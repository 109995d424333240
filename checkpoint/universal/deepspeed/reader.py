"""Reading a DeepSpeed checkpoint: :func:`import_deepspeed` finds the tag folder and hands it to the reader of its
kind (ZeRO stage 1, 2 or 3 partitions, or DeepSpeed's universal layout)."""

from __future__ import annotations

from pathlib import Path

from regrow.checkpoint.universal.deepspeed.errors import DeepSpeedCheckpointError
from regrow.checkpoint.universal.deepspeed.full_state import FullState
from regrow.checkpoint.universal.deepspeed.layout import checked_tag
from regrow.checkpoint.universal.deepspeed.universal_reader import read_universal
from regrow.checkpoint.universal.deepspeed.zero_reader import read_zero

MAX_POINTER_BYTES = 1024
"""The longest ``latest`` file read: it holds one tag name (DeepSpeed writes e.g. ``global_step1000``)."""


def import_deepspeed(path: str | Path, tag: str | None = None) -> FullState:
    """Reads a DeepSpeed checkpoint into a :class:`FullState`.

    ``path`` is the directory given to ``engine.save_checkpoint()`` (the tag is read from its ``latest`` file, or
    from ``latest_universal`` when there is no ``latest``, as DeepSpeed's loader does), or one tag folder inside it.
    ``tag`` names the folder explicitly. Three kinds are read:

    - ZeRO stage 1 or 2 (fp32, or bf16/fp16 mixed precision: the fp32 masters are read), with any data-parallel
      size: ``mp_rank_00_model_states.pt`` plus one ``[bf16_]zero_pp_rank_<dp>_mp_rank_00_optim_states.pt`` per rank.
    - ZeRO stage 3: one ``zero_pp_rank_<dp>_mp_rank_00_model_states.pt`` and one optimizer file per rank, each
      parameter partitioned on its own (``zero3_reader.py``).
    - DeepSpeed universal (``ds_to_universal`` output or :func:`export_deepspeed_universal`): ``zero/<name>/...``.

    Raises :class:`UnsupportedCheckpointError` for pipeline- or tensor-parallel checkpoints, checkpoints
    without ZeRO and non-Adam optimizers; :class:`DeepSpeedCheckpointError` for missing or inconsistent files;
    :class:`UnsafeCheckpointError` for a file with a global outside ``unpickling.ALLOWED_GLOBALS``.
    """
    folder = _resolve_folder(Path(path), tag)
    if (folder / "zero").is_dir():
        return read_universal(folder)
    return read_zero(folder)


def _resolve_folder(root: Path, tag: str | None) -> Path:
    """The tag folder to read: ``root / tag``; else ``root`` itself when it is one; else the folder that ``latest``
    (or, without it, ``latest_universal``) names."""
    if not root.is_dir():
        raise DeepSpeedCheckpointError(f"{root} is not a directory; pass the directory given to DeepSpeed's "
                                       "save_checkpoint(), or one tag folder inside it")
    if tag is not None:
        folder = root / checked_tag(tag, f"tag={tag!r}")
        if not folder.is_dir():
            raise DeepSpeedCheckpointError(f"{folder} does not exist; tags in {root}: {_subdirs(root)}")
        return folder
    if _is_tag_folder(root):
        return root
    for pointer in ("latest", "latest_universal"):
        pointer_file = root / pointer
        if pointer_file.is_file():
            name = checked_tag(_read_pointer(pointer_file), f"{pointer_file}")
            folder = root / name
            if not folder.is_dir():
                raise DeepSpeedCheckpointError(f"{pointer_file} names tag {name!r}, but {folder} does not exist; "
                                               f"pass tag= one of {_subdirs(root)}")
            return folder
    raise DeepSpeedCheckpointError(f"{root} holds no DeepSpeed checkpoint: no 'latest' or 'latest_universal' file "
                                   f"and no *_states.pt files or zero/ folder; pass tag= one of {_subdirs(root)}")


def _read_pointer(pointer_file: Path) -> str:
    """The tag that ``latest`` (or ``latest_universal``) names: at most :data:`MAX_POINTER_BYTES` of UTF-8 text,
    stripped; anything longer or undecodable is :class:`DeepSpeedCheckpointError`, read no further."""
    try:
        with open(pointer_file, "rb") as file:
            data = file.read(MAX_POINTER_BYTES + 1)
    except OSError as error:
        raise DeepSpeedCheckpointError(f"{pointer_file} cannot be read: {error}") from None
    if len(data) > MAX_POINTER_BYTES:
        raise DeepSpeedCheckpointError(f"{pointer_file} is longer than {MAX_POINTER_BYTES} bytes; it should hold one "
                                       "tag name (pass tag= instead)")
    try:
        return data.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise DeepSpeedCheckpointError(f"{pointer_file} is not UTF-8 text; it should hold one tag name (pass tag= "
                                       "instead)") from None


def _is_tag_folder(folder: Path) -> bool:
    return (folder / "zero").is_dir() or any(folder.glob("*_states.pt"))


def _subdirs(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_dir())
