"""Coverage-guided fuzz targets (atheris) for every parser that meets outside bytes.

One target per file, ``fuzz_<name>.py``, defining ``test_one_input(data: bytes) -> None``; its seed
corpus in ``corpus/<name>/``, regression inputs of crashes found in ``crashes/<name>/``. Run one
with ``python -m tests.fuzz.run NAME``; tests/test_fuzz.py replays every corpus and crash file and
fuzzes each target briefly. See README.md. Nothing is imported here: the runner must import
imprint's modules for the first time inside atheris.instrument_imports().
"""
