"""``python -m cdm_cli`` = ``cdm`` (what torchrun launches: ``torchrun ... -m cdm_cli teacher train``)."""

from cdm_cli import main

main()
