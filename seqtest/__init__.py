"""seqtest: a testbed for long-range dependencies in recurrent networks."""

__version__ = "0.1.0"
