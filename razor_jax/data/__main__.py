"""Prepares a dataset ahead of time.

  python -m razor_jax.data NAME [--data_dir DIR] [--manual_dir DIR]
"""
import argparse
import sys

from razor_jax import data


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m razor_jax.data",
      description="Prepare a dataset for razor_jax (download, or build from manual files).")
  parser.add_argument("name", help=f"one of {', '.join(sorted(data.DATASETS))}")
  parser.add_argument("--data_dir", default=None,
                      help="default: $TFDS_DATA_DIR or ~/tensorflow_datasets")
  parser.add_argument("--manual_dir", default=None,
                      help="folder holding manually downloaded source files")
  args = parser.parse_args(argv)
  try:
    path = data.prepare(args.name, args.data_dir, args.manual_dir)
    info = data.dataset_info(args.name)
    print(f"{args.name}: {path}")
    for split in (info.train_split, info.eval_split):
      print(f"  {split}: {data.num_examples(args.name, split, args.data_dir)} examples")
  except (data.DatasetMissingError, ValueError) as error:
    print(f"error: {error}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
