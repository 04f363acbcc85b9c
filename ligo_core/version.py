"""The package version, in a module of its own so that any module can read it without importing the
package (whose lazy attributes import the pipeline)."""

__version__ = "0.1.0"
