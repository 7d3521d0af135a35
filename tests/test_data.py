"""lesion.data: both metadata layouts, every bad-data error, lesion-level splits, the image cache."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import lesion.data as data
import lesion.data.cache as data_cache
from lesion.data import (
    ImageCache,
    LesionDataset,
    check_images,
    read_metadata,
    read_split,
    select_subset,
    split_by_lesion,
    write_split,
)
from lesion.errors import DataError, InvalidImage
from lesion.images import load_image
from lesion.transforms import eval_transform

SAMPLES = Path(__file__).resolve().parent.parent / "assets" / "samples" / "lesions"
DEMO = Path(__file__).resolve().parent.parent / "assets" / "demo"
SAMPLE_FILES = sorted(SAMPLES.glob("*.jpg"))


def _place(folder: Path, image_id: str, source: Path, suffix: str = ".jpg") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{image_id}{suffix}"
    shutil.copyfile(source, target)
    return target


def _ham_rows() -> list[dict[str, str]]:
    # 4 lesions with two images each, 4 with one; dx spelled in mixed case once.
    rows = []
    dxs = ["nv", "mel", "bkl", "BCC", "df", "akiec", "vasc", "mel"]
    for i, dx in enumerate(dxs):
        images = 2 if i < 4 else 1
        for j in range(images):
            rows.append({"lesion_id": f"HAM_{i:07d}", "image_id": f"ISIC_{i:05d}{j}", "dx": dx, "dx_type": "histo"})
    return rows


@pytest.fixture
def ham_dir(tmp_path: Path) -> Path:
    """A HAM10000-style folder: metadata at the top, images split over two nested part folders."""
    rows = _ham_rows()
    for k, row in enumerate(rows):
        part = "HAM10000_images_part_1" if k % 2 else "nested/HAM10000_images_part_2"
        _place(tmp_path / part, row["image_id"], SAMPLE_FILES[k])
    pd.DataFrame(rows).to_csv(tmp_path / "HAM10000_metadata.csv", index=False)
    return tmp_path


def test_ham_layout_reads_labels_paths_and_summary(ham_dir: Path) -> None:
    df, summary = read_metadata(ham_dir)
    assert list(df.columns) == ["image_id", "lesion_id", "dx", "label", "path"]
    assert len(df) == 12 and summary["n_images"] == 12 and summary["n_lesions"] == 8
    assert summary["layout"] == "ham10000"
    assert summary["metadata"].endswith("HAM10000_metadata.csv")
    labels = dict(zip(df["dx"], df["label"], strict=False))
    assert labels == {"nv": 0, "mel": 1, "bkl": 0, "bcc": 1, "df": 0, "akiec": 1, "vasc": 0}
    assert summary["counts"] == {"benign": int((df["label"] == 0).sum()), "malignant": int((df["label"] == 1).sum())}
    assert summary["dx_counts"]["mel"] == 3 and summary["dropped_indeterminate"] == 0
    for path in df["path"]:
        assert Path(path).is_absolute() and Path(path).is_file()
    assert {Path(p).parent.name for p in df["path"]} == {"HAM10000_images_part_1", "HAM10000_images_part_2"}


def test_metadata_found_one_level_down_and_png_images(tmp_path: Path) -> None:
    rows = [{"lesion_id": "L1", "image_id": "a", "dx": "nv"}, {"lesion_id": "L2", "image_id": "b", "dx": "mel"}]
    (tmp_path / "meta").mkdir()
    pd.DataFrame(rows).to_csv(tmp_path / "meta" / "metadata.csv", index=False)
    _place(tmp_path / "imgs", "a", SAMPLE_FILES[0], ".png")
    _place(tmp_path / "imgs", "b", SAMPLE_FILES[1], ".jpeg")
    df, summary = read_metadata(tmp_path)
    assert summary["metadata"].endswith(os.path.join("meta", "metadata.csv"))
    assert df["label"].tolist() == [0, 1]


def test_bundled_samples_csv_with_empty_lesion_ids(tmp_path: Path) -> None:
    df, summary = read_metadata(SAMPLES, "labels.csv")
    assert summary["n_images"] == 40 and summary["n_lesions"] == 40  # empty lesion_id -> the image's own
    expected = pd.read_csv(SAMPLES / "labels.csv", dtype=str, keep_default_na=False)
    empty = set(expected.loc[expected["lesion_id"] == "", "image_id"])
    assert 0 < len(empty) < 40
    own = df[df["image_id"].isin(empty)]
    assert (own["lesion_id"] == own["image_id"]).all()
    assert not (df[~df["image_id"].isin(empty)]["lesion_id"] == df[~df["image_id"].isin(empty)]["image_id"]).any()
    assert dict(zip(df["image_id"], df["label"], strict=True)) == {
        i: int(lbl == "malignant") for i, lbl in zip(expected["image_id"], expected["label"], strict=True)
    }


def _isic_dir(tmp_path: Path, rows: list[dict[str, str]]) -> Path:
    for k, row in enumerate(rows):
        _place(tmp_path / "images", row["isic_id"], SAMPLE_FILES[k])
    pd.DataFrame(rows).to_csv(tmp_path / "metadata.csv", index=False)
    return tmp_path


def test_isic_new_export(tmp_path: Path) -> None:
    def row(i: int, lesion: str, d1: str, d2: str, d3: str) -> dict[str, str]:
        return {
            "isic_id": f"ISIC_{i:07d}",
            "lesion_id": lesion,
            "diagnosis_1": d1,
            "diagnosis_2": d2,
            "diagnosis_3": d3,
        }

    rows = [
        row(1, "IL_1", "Benign", "Benign melanocytic proliferations", "Nevus"),
        row(2, "IL_1", "Benign", "Benign melanocytic proliferations", "NEVUS"),
        row(3, "IL_2", "Malignant", "Malignant melanocytic proliferations (Melanoma)", "Melanoma Invasive"),
        row(4, "", "Malignant", "Malignant adnexal epithelial proliferations - Follicular", "Basal cell carcinoma"),
        row(5, "IL_4", "Indeterminate", "Indeterminate epidermal proliferations", "Solar or actinic keratosis"),
        row(6, "IL_5", "Benign", "Benign soft tissue proliferations", ""),  # no dx maps: "other", benign
        row(7, "IL_6", "Malignant", "", ""),  # only the coarse label
    ]
    df, summary = read_metadata(_isic_dir(tmp_path, rows))
    assert summary["layout"] == "isic" and summary["dropped_indeterminate"] == 1
    got = {r.image_id: (r.dx, r.label, r.lesion_id) for r in df.itertuples()}
    assert got == {
        "ISIC_0000001": ("nv", 0, "IL_1"),
        "ISIC_0000002": ("nv", 0, "IL_1"),
        "ISIC_0000003": ("mel", 1, "IL_2"),
        "ISIC_0000004": ("bcc", 1, "ISIC_0000004"),
        "ISIC_0000006": ("other", 0, "IL_5"),
        "ISIC_0000007": ("other", 1, "IL_6"),
    }
    assert summary["dx_counts"] == {"bcc": 1, "mel": 1, "nv": 2, "other": 2}


def test_isic_old_export_benign_malignant_and_diagnosis(tmp_path: Path) -> None:
    rows = [
        {"isic_id": "ISIC_1", "lesion_id": "A", "benign_malignant": "benign", "diagnosis": "seborrheic keratosis"},
        {"isic_id": "ISIC_2", "lesion_id": "B", "benign_malignant": "malignant", "diagnosis": "melanoma"},
        {"isic_id": "ISIC_3", "lesion_id": "C", "benign_malignant": "indeterminate", "diagnosis": ""},
        {
            "isic_id": "ISIC_4",
            "lesion_id": "D",
            "benign_malignant": "malignant",
            "diagnosis": "squamous cell carcinoma",
        },
        {"isic_id": "ISIC_5", "lesion_id": "E", "benign_malignant": "benign", "diagnosis": "lentigo NOS"},
    ]
    df, summary = read_metadata(_isic_dir(tmp_path, rows))
    assert dict(zip(df["image_id"], df["dx"], strict=True)) == {
        "ISIC_1": "bkl",
        "ISIC_2": "mel",
        "ISIC_4": "scc",
        "ISIC_5": "bkl",
    }
    assert df["label"].tolist() == [0, 1, 1, 0]
    assert summary["dropped_indeterminate"] == 1


def test_missing_csv_names_folder_and_files(tmp_path: Path) -> None:
    with pytest.raises(DataError) as error:
        read_metadata(tmp_path)
    message = str(error.value)
    assert str(tmp_path) in message and "HAM10000_metadata.csv" in message and "metadata.csv" in message
    with pytest.raises(DataError, match="not found"):
        read_metadata(tmp_path / "nowhere")
    with pytest.raises(DataError, match="other.csv"):
        read_metadata(tmp_path, "other.csv")


def test_missing_columns_name_file_columns_and_layout(tmp_path: Path) -> None:
    pd.DataFrame([{"image_id": "a", "diagnosis": "nv"}]).to_csv(tmp_path / "metadata.csv", index=False)
    with pytest.raises(DataError) as error:
        read_metadata(tmp_path)
    message = str(error.value)
    assert "metadata.csv" in message and "lesion_id" in message and "dx" in message and "HAM10000" in message
    pd.DataFrame([{"isic_id": "a", "lesion_id": "x"}]).to_csv(tmp_path / "metadata.csv", index=False)
    with pytest.raises(DataError, match=r"diagnosis_1.*ISIC archive"):
        read_metadata(tmp_path)


def test_missing_image_error_and_skip(ham_dir: Path) -> None:
    removed = sorted(ham_dir.rglob("ISIC_*.jpg"))[:6]
    for path in removed:
        path.unlink()
    with pytest.raises(DataError) as error:
        read_metadata(ham_dir)
    message = str(error.value)
    ids = sorted(p.stem for p in removed)
    assert "6 of 12" in message and ids[0] in message and ids[4] in message and ids[5] not in message
    assert "--skip-bad-images=true" in message
    df, summary = read_metadata(ham_dir, skip_bad=True)
    assert len(df) == 6 and sorted(summary["skipped"]["missing"]) == ids
    assert summary["n_images"] == 6


def test_unknown_dx_error_and_skip(ham_dir: Path) -> None:
    rows = _ham_rows()
    rows[0]["dx"] = "xyz"
    pd.DataFrame(rows).to_csv(ham_dir / "HAM10000_metadata.csv", index=False)
    with pytest.raises(DataError) as error:
        read_metadata(ham_dir)
    assert "1 image(s)" in str(error.value) and "xyz" in str(error.value) and rows[0]["image_id"] in str(error.value)
    df, summary = read_metadata(ham_dir, skip_bad=True)
    assert summary["skipped"]["unknown_dx"] == [rows[0]["image_id"]] and len(df) == 11


def test_duplicate_image_ids_are_refused(ham_dir: Path) -> None:
    rows = _ham_rows()
    rows.append(dict(rows[3]))
    pd.DataFrame(rows).to_csv(ham_dir / "HAM10000_metadata.csv", index=False)
    with pytest.raises(DataError, match=rf"more than once: {rows[3]['image_id']}"):
        read_metadata(ham_dir, skip_bad=True)


# ----------------------------------------------------------------------------- splits


def _synthetic(n_lesions: int, per_lesion: int = 1, malignant_every: int = 2, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for lesion in range(n_lesions):
        label = int(lesion % malignant_every == 0)
        for j in range(int(rng.integers(1, per_lesion + 1))):
            rows.append({"image_id": f"img{lesion}_{j}", "lesion_id": f"L{lesion}", "dx": "mel" if label else "nv"})
            rows[-1]["label"] = label
    frame = pd.DataFrame(rows)
    frame["path"] = "/nowhere/" + frame["image_id"] + ".jpg"
    return frame


def _assert_no_leak(split: pd.DataFrame) -> None:
    assert split.groupby("lesion_id")["fold"].nunique().max() == 1


@pytest.mark.parametrize("n_lesions, per_lesion, every", [(6, 1, 2), (40, 1, 3), (300, 6, 3), (10015, 1, 5)])
def test_split_has_no_lesion_leak_and_both_labels_everywhere(n_lesions: int, per_lesion: int, every: int) -> None:
    df = _synthetic(n_lesions, per_lesion, malignant_every=every)
    split = split_by_lesion(df, 0.15, 0.15, seed=0)
    _assert_no_leak(split)
    table = split.groupby(["fold", "label"]).size()
    assert all(table.get((fold, label), 0) > 0 for fold in ("train", "val", "test") for label in (0, 1))
    if n_lesions >= 300:  # stratified: each fold keeps the lesion-level malignant share
        lesion_label = split.groupby("lesion_id")[["label", "fold"]].first()
        shares = lesion_label.groupby("fold")["label"].mean()
        assert np.allclose(shares.to_numpy(), lesion_label["label"].mean(), atol=0.03)
        sizes = lesion_label["fold"].value_counts(normalize=True)
        assert abs(sizes["val"] - 0.15) < 0.02 and abs(sizes["test"] - 0.15) < 0.02


def test_split_gives_each_fold_every_diagnosis_in_its_share() -> None:
    # Two benign and two malignant diagnoses of very different sizes, as in HAM10000 (nv dominates).
    rng = np.random.default_rng(5)
    sizes = {"nv": 600, "bkl": 60, "mel": 100, "df": 0, "bcc": 40}
    rows = []
    for dx, count in sizes.items():
        for i in range(count):
            label = int(dx in ("mel", "bcc"))
            for j in range(int(rng.integers(1, 3))):
                rows.append({"image_id": f"{dx}{i}_{j}", "lesion_id": f"{dx}{i}", "dx": dx, "label": label})
    df = pd.DataFrame(rows)
    for seed in range(3):
        split = split_by_lesion(df, 0.15, 0.15, seed=seed)
        _assert_no_leak(split)
        per_lesion = split.groupby("lesion_id")[["dx", "fold"]].first()
        counts = pd.crosstab(per_lesion["dx"], per_lesion["fold"])
        for dx, count in sizes.items():
            if count:  # val and test each hold 15 % of every diagnosis, give or take one lesion
                assert abs(counts.at[dx, "val"] - 0.15 * count) <= 1.5, (seed, dx, counts)
                assert abs(counts.at[dx, "test"] - 0.15 * count) <= 1.5, (seed, dx, counts)


def test_split_of_the_demo_set_matches_validation_to_test() -> None:
    from lesion.data import read_metadata

    frame, _ = read_metadata(Path(__file__).resolve().parent.parent / "assets" / "demo")
    split = split_by_lesion(frame, 0.15, 0.15, seed=0)
    per_lesion = split.groupby("lesion_id")[["dx", "fold"]].first()
    counts = pd.crosstab(per_lesion["dx"], per_lesion["fold"])
    # Nevi and melanomas come from other ISIC collections than the rest: equal shares in val and test.
    assert (counts["val"] - counts["test"]).abs().max() <= 2, counts


def test_split_is_deterministic_and_ignores_row_order() -> None:
    df = _synthetic(200, 4)
    first = split_by_lesion(df, 0.2, 0.1, seed=7).set_index("image_id")["fold"]
    shuffled = df.sample(frac=1.0, random_state=3)
    second = split_by_lesion(shuffled, 0.2, 0.1, seed=7).set_index("image_id")["fold"]
    assert first.sort_index().equals(second.sort_index())
    other = split_by_lesion(df, 0.2, 0.1, seed=8).set_index("image_id")["fold"]
    assert not first.sort_index().equals(other.sort_index())


def test_split_of_mixed_lesion_counts_as_malignant() -> None:
    df = _synthetic(12, 1)
    df.loc[len(df)] = {"image_id": "extra", "lesion_id": "L1", "dx": "mel", "label": 1, "path": "/x.jpg"}
    split = split_by_lesion(df, 0.2, 0.2, seed=0)
    _assert_no_leak(split)


def test_split_too_small_says_how_many_images_are_needed() -> None:
    with pytest.raises(DataError, match=r"3 benign and 3 malignant lesions \(6 images\).*2 benign, 3 malignant"):
        split_by_lesion(_synthetic(5, 1), 0.15, 0.15, seed=0)


def test_split_round_trip(tmp_path: Path) -> None:
    df = split_by_lesion(_synthetic(30, 2), 0.15, 0.15, seed=1)
    df["image_id"] = "00" + df["image_id"]  # ids that look like numbers stay strings
    path = write_split(df, tmp_path / "run" / "split.csv")
    text = path.read_text().splitlines()
    assert text[0] == "image_id,lesion_id,dx,label,fold" and ",malignant," in "\n".join(text)
    back = read_split(path)
    pd.testing.assert_frame_equal(back, df[["image_id", "lesion_id", "dx", "label", "fold"]].reset_index(drop=True))
    assert not list(path.parent.glob("*.tmp"))


def test_select_subset_whole_lesions_stratified_deterministic() -> None:
    df = _synthetic(400, 3, malignant_every=4)
    sub = select_subset(df, 120, seed=0)
    assert 100 <= len(sub) <= 120
    assert sub.equals(select_subset(df.sample(frac=1.0, random_state=1), 120, seed=0).sort_index())
    whole = df[df["lesion_id"].isin(sub["lesion_id"])]
    assert len(whole) == len(sub)
    assert abs(sub["label"].mean() - df["label"].mean()) < 0.08
    assert len(select_subset(df, 0, seed=0)) == len(df) and len(select_subset(df, 10**6, seed=0)) == len(df)


# ----------------------------------------------------------------------------- image cache


def test_cache_pixels_equal_load_image(tmp_path: Path) -> None:
    cache = ImageCache(tmp_path, 146)
    for source in SAMPLE_FILES[:3]:
        expected = np.asarray(load_image(source, 146))
        assert np.array_equal(np.asarray(cache.get(source)), expected)  # decoded now
        assert np.array_equal(np.asarray(cache.get(source)), expected)  # read from the cache
        entry = cache.entry(source)
        assert entry.is_file() and entry.parent.parent == tmp_path / "146" and entry.parent.name == entry.stem[:2]
        assert np.load(entry).dtype == np.uint8


def test_cache_hit_does_not_decode_and_change_does(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    image = _place(tmp_path / "src", "a", SAMPLE_FILES[0])
    cache = ImageCache(tmp_path / "cache", 64)
    calls: list[str] = []
    real = data_cache.load_image

    def counting(path, short_side=None):
        calls.append(str(path))
        return real(path, short_side)

    monkeypatch.setattr(data_cache, "load_image", counting)
    cache.get(image)
    cache.get(image)
    ImageCache(tmp_path / "cache", 64).get(image)  # a later run shares the entries
    assert len(calls) == 1
    ImageCache(tmp_path / "cache", 80).get(image)  # another size is another entry
    assert len(calls) == 2
    shutil.copyfile(SAMPLE_FILES[1], image)  # replaced file: new size / mtime -> decoded again
    os.utime(image, ns=(10**18, 10**18))
    assert np.array_equal(np.asarray(cache.get(image)), np.asarray(real(SAMPLE_FILES[1], 64)))
    assert len(calls) == 3


def test_cache_write_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = ImageCache(tmp_path, 64)
    source = SAMPLE_FILES[0]
    real_save = np.save

    def half_then_crash(handle, array, allow_pickle=False):
        handle.write(b"\x93NUMPY partial")
        raise OSError("disk full")

    monkeypatch.setattr(np, "save", half_then_crash)
    image = cache.get(source)  # the image is still returned
    assert image.size == load_image(source, 64).size
    assert not cache.entry(source).exists() and not list(tmp_path.rglob("*.tmp"))
    monkeypatch.setattr(np, "save", real_save)
    seen: list[tuple[str, str]] = []
    real_replace = os.replace

    def watching(src, dst):
        seen.append((str(src), str(dst)))
        assert Path(src).stat().st_size > 64 * 64 * 3 and not Path(dst).exists()
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", watching)
    cache.get(source)
    assert seen and seen[0][1] == str(cache.entry(source)) and seen[0][0].endswith(".tmp")


def test_cache_missing_file_raises_invalid_image(tmp_path: Path) -> None:
    with pytest.raises(InvalidImage, match="gone.jpg: no such file"):
        ImageCache(tmp_path, 64).get(tmp_path / "gone.jpg")


def test_damaged_cache_entry_is_decoded_again(tmp_path: Path) -> None:
    cache = ImageCache(tmp_path, 64)
    entry = cache.entry(SAMPLE_FILES[0])
    entry.parent.mkdir(parents=True)
    entry.write_bytes(b"not an array")
    assert np.array_equal(np.asarray(cache.get(SAMPLE_FILES[0])), np.asarray(load_image(SAMPLE_FILES[0], 64)))
    assert np.load(entry).shape[2] == 3


@pytest.fixture
def with_bad_image(tmp_path: Path) -> tuple[pd.DataFrame, Path]:
    folder = tmp_path / "imgs"
    rows = []
    for k, source in enumerate(SAMPLE_FILES[:8]):
        _place(folder, f"img{k}", source)
        rows.append({"image_id": f"img{k}", "lesion_id": f"L{k}", "dx": "nv", "label": 0})
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    rows.append({"image_id": "broken", "lesion_id": "Lb", "dx": "mel", "label": 1})
    frame = pd.DataFrame(rows)
    frame["path"] = [str(folder / f"{i}.jpg") for i in frame["image_id"]]
    return frame, tmp_path / "cache"


@pytest.mark.parametrize("workers", [1, 2])
def test_warm_reports_unreadable_without_raising(with_bad_image, workers: int) -> None:
    frame, cache_root = with_bad_image
    cache = ImageCache(cache_root, 64)
    report = cache.warm(frame["path"].tolist(), workers=workers, ids=frame["image_id"].tolist())
    assert report["decoded"] == 8 and report["cached"] == 0
    assert [i for i, _ in report["unreadable"]] == ["broken"] and "broken.jpg" in report["unreadable"][0][1]
    again = cache.warm(frame["path"].tolist(), workers=workers)
    assert again["decoded"] == 0 and again["cached"] == 8 and again["unreadable"][0][0].endswith("broken.jpg")


def test_check_images_raises_or_skips(with_bad_image) -> None:
    frame, cache_root = with_bad_image
    cache = ImageCache(cache_root, 64)
    with pytest.raises(DataError, match=r"1 of 9 image\(s\) could not be read: broken"):
        check_images(frame, cache, skip_bad=False, workers=1)
    kept, unreadable = check_images(frame, cache, skip_bad=True, workers=1)
    assert len(kept) == 8 and [i for i, _ in unreadable] == ["broken"]
    kept, unreadable = check_images(frame, None, skip_bad=True, workers=1)
    assert len(kept) == 8 and len(unreadable) == 1


def test_dataset_same_tensors_with_and_without_cache(tmp_path: Path) -> None:
    paths = [str(p) for p in SAMPLE_FILES[:4]]
    transform = eval_transform(64)
    plain = LesionDataset(paths, [0, 1, 0, 1], transform, None, 73)
    cached = LesionDataset(paths, [0, 1, 0, 1], transform, ImageCache(tmp_path, 73), 73)
    assert len(plain) == 4
    for index in range(4):
        (a, label_a), (b, label_b) = plain[index], cached[index]
        assert a.shape == (3, 64, 64) and a.dtype == torch.float32
        assert torch.equal(a, b) and label_a == label_b == index % 2
    with pytest.raises(ValueError, match="short side"):
        LesionDataset(paths, [0] * 4, transform, ImageCache(tmp_path, 64), 73)


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LESION_CACHE_DIR", str(tmp_path))
    assert data.default_cache_dir() == tmp_path
    monkeypatch.delenv("LESION_CACHE_DIR")
    assert data.default_cache_dir() == Path.home() / ".cache" / "lesion"


def test_demo_set_reads_and_splits() -> None:
    df, summary = read_metadata(DEMO)
    assert summary["n_images"] == len(df) == 929 and not summary["skipped"]["missing"]
    split = split_by_lesion(df, 0.15, 0.15, seed=0)
    _assert_no_leak(split)
    assert set(split["fold"]) == {"train", "val", "test"}
