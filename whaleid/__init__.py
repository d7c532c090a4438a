"""whaleid: photo-identification of individual whales and dolphins (Happywhale-style pipeline)."""

__version__ = "0.1.0"
