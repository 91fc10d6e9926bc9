import warnings

import pytest
import torch

import timm_qsenn.data
from timm_qsenn.data import DataConfig, EpochSampler, SeededAugmentation, build_datasets
from timm_qsenn.train.config import load_config

from .conftest import write_image


def test_image_folder_and_subsets(tmp_path):
    for split in ("train", "val"):
        for c in ("cat", "dog"):
            for i in range(3):
                write_image(tmp_path / split / c / f"{i}.png", value=40 * i)
    cfg = load_config(overrides=[f"data.root={tmp_path}", "data.img_size=16", "data.train_per_class=2"]).data
    bundle = build_datasets(cfg)
    assert bundle.classes == ["cat", "dog"] and len(bundle.train) == 4 and len(bundle.test) == 6
    image, _ = bundle.train_eval[0]
    assert tuple(image.shape) == (3, 16, 16)
    assert bundle.train.transform is not bundle.train_eval.transform


def test_epoch_sampler_is_a_function_of_seed_and_epoch():
    sampler = EpochSampler(10, seed=3)
    sampler.start_epoch(2)
    order = list(sampler)
    assert sorted(order) == list(range(10))
    sampler.start_epoch(1)
    assert list(sampler) != order
    sampler.start_epoch(2, skip=4)
    assert list(sampler) == order[4:] and len(sampler) == 6


def test_seeded_augmentation_repeats_per_sample_and_epoch():
    class Noise(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return torch.rand(1).item()

    data = SeededAugmentation(Noise(), seed=0)
    first = [data[i] for i in range(4)]
    torch.rand(5)  # the global RNG moves on; the samples do not
    assert [data[i] for i in (3, 2, 1, 0)] == first[::-1]
    data.epoch = 1
    assert [data[i] for i in range(4)] != first


def test_the_old_train_paths_still_work_with_a_deprecation_warning():
    from timm_qsenn.train import config

    assert config.DataConfig is DataConfig
    with pytest.warns(DeprecationWarning, match="import EpochSampler from timm_qsenn.data"):
        from timm_qsenn.train.data import EpochSampler as old
    assert old is EpochSampler
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for name in timm_qsenn.data.__all__:
            getattr(timm_qsenn.data, name)  # the new home never warns
    with pytest.raises(AttributeError, match="no attribute 'missing'"):
        import timm_qsenn.train.data as alias

        alias.missing  # noqa: B018
