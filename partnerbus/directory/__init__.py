"""The partner directory: who is the right partner for this need, this person, this place,
and why. Pure matching over a networkx graph; loading at the edge."""

from .datainclusion import load_data_inclusion
from .errors import DirectoryError, RowError
from .load import load_directory, load_sample
from .match import Candidate, match
from .model import Directory

__all__ = [
    "Candidate",
    "Directory",
    "DirectoryError",
    "RowError",
    "load_data_inclusion",
    "load_directory",
    "load_sample",
    "match",
]
