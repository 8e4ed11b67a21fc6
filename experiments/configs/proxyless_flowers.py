"""ProxylessNAS-Mobile on Oxford Flowers-102 with Back Razor@0.9: the paper's Tables 2-3.

  python experiments/finetune.py --config proxyless_flowers \
      --config.init_path=/path/to/proxyless_mobile.npz --workdir workdir/proxyless_flowers

The recipe of the original code's CNN runs (VITA-Group/BackRazor_Neurips22,
cmds/CNN/*.sh, on TinyTL's tinytl_fgvc_train.py): batch 8, Adam at 1e-4 with a cosine
schedule and no warm-up, 50 epochs, random crops of 22-100% of the image, label
smoothing 0.7, dropout 0.2 before a new classifier, BatchNorm fixed (`full_noBN`),
every conv and the classifier pruned at 0.9.

Init: ProxylessNAS-Mobile's ImageNet weights are published only as a PyTorch pickle,
which razor_jax does not read, so there is no default file: convert them once to the
.npz of razor_jax.models.mobilenet_checkpoint.save_npz (Keras-style layer names, see
razor_jax.models.mobilenet) and pass its path. The default init_path names such a file
in the working directory, so a run without it stops at once and says so;
--config.init_path='' trains from random initialization instead (a choice, far below
the paper's accuracy). The converted weights expect torchvision's mean/std input
normalization, not the [-1, 1] pixels of razor_jax.data: fold it into the stem conv.

Expected (the paper's Table 2): 96.9% top-1 on the test split, the same as the
ActNN-style peer (--config.model.compression=actnn --config.prune_ratio=0); Table 4 is
--config.optimizer.name=sgd --config.prune_ratio=0.8 (96.7%, 97.1% fully fine-tuned).
The project has not run this config to the end yet.
"""
from razor_jax.train import config as train_config


def get_config():
  config = train_config.get_config()  # every field is documented there
  config.dataset = "oxford_flowers102"  # 102 species; train+validation (2040) / test (6149)
  config.image_size = 224
  config.crop_area_min = 0.22  # tinytl_fgvc_train.py's --resize_scale default
  config.batch_size = 8  # the paper's CNN runs (Tables 2 and 4); Table 3 is batch 1
  config.eval_batch_size = 96
  config.model.name = "proxyless_mobile"  # 4,080,512 parameters at 1000 classes
  config.model.batch_norm = "fixed"  # running statistics, scale and bias frozen (full_noBN)
  config.model.dropout_rate = 0.2  # before the classifier, as TinyTL's LinearLayer
  # A converted ImageNet checkpoint in save_npz's layout (see the docstring).
  config.init_path = "proxyless_mobile_imagenet.npz"
  config.prune_ratio = 0.9  # Back Razor@90%, the head too (--backRazor_pruneRatio_head)
  config.optimizer.name = "adam"
  config.lr = 1e-4
  config.warmup_steps = 0  # tinytl_fgvc_train.py's cosine schedule has none
  config.total_steps = 12750  # 50 epochs of 2040 images at batch 8 (255 steps each)
  config.label_smoothing = 0.7  # as cmds/CNN/*.sh pass it
  config.grad_clip_norm = 0.0  # the original code does not clip
  config.eval_every = 1275  # every 5 epochs
  config.checkpoint_every = 1275
  return config
