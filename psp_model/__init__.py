"""psp-fl core library: data layouts, preprocessing, models and evaluation. Imports no Flower."""

import logging as _logging
import os as _os
import warnings as _warnings

__version__ = "0.1.0"

# MONAI warns, for every DICOM reader it builds, that the optional GPU decoder is missing; we read
# DICOM with pydicom directly and the warnings drowned the progress bars.
_logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(_logging.ERROR)
_warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader")

# OpenMP threads that spin while they wait collapse when the cores are shared with other jobs: a
# fine-tuning epoch on demo tokens took 6.9 s with 2 spinning threads at load 4, 0.33 s passive (one
# thread: 0.33 s). Set before torch loads its OpenMP runtime; a value the user set wins.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
