from normalize_core._core import *  # noqa
