"""psp-fl core library: data layouts, preprocessing, models and evaluation. Imports no Flower."""

import logging as _logging
import warnings as _warnings

__version__ = "0.1.0"

# MONAI warns, for every DICOM reader it builds, that the optional GPU decoder is missing; we read
# DICOM with pydicom directly and the warnings drowned the progress bars.
_logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(_logging.ERROR)
_warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader")
