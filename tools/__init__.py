"""Developer tooling that is not part of the pipeline or the library: tools/docs.py regenerates the generated docs."""
