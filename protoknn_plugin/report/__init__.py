"""Static HTML reports of trained runs (``protoknn report``), one run or several side by side."""
from .site import DEFAULT_IMAGES, write_comparison_report, write_report

__all__ = ["DEFAULT_IMAGES", "write_report", "write_comparison_report"]
