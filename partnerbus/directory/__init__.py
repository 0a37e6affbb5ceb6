"""The partner directory: who is the right partner for this need, this person, this place,
and why. Pure matching over a networkx graph; loading at the edge."""

from partnerbus.directory.datainclusion import load_data_inclusion
from partnerbus.directory.errors import DirectoryError, RowError
from partnerbus.directory.load import load_directory, load_sample
from partnerbus.directory.match import Candidate, match
from partnerbus.directory.model import Directory, MatchIndex

__all__ = [
    "Candidate",
    "Directory",
    "DirectoryError",
    "MatchIndex",
    "RowError",
    "load_data_inclusion",
    "load_directory",
    "load_sample",
    "match",
]
