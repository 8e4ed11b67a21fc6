"""The error every data source raises when a dataset is not on disk."""


class DatasetMissingError(RuntimeError):
  """A dataset is not prepared where it was looked for, and was not prepared now.

  The message names the dataset, the directory searched and how to prepare it.
  """
