"""Video datasets end to end for a video family (CogVideoX): `GradientIndex.build` over a `datasets.Dataset` whose
column holds a video per row, `dmin build --image-column video` over GIFs and frame folders, `dmin search` with a GIF.

The ground truth of every build is the sketcher called directly on the original `(B, F, C, H, W)` videos: the index
rows must be those sketches, whatever form the dataset stores the videos in.
"""

from __future__ import annotations

import json

import numpy as np
import PIL.Image
import pytest
import torch

from diffusers_dmin import DatasetError, DMinConfig, GradientIndex, GradientSketcher, InfluencePipeline
from diffusers_dmin.cli import main
from diffusers_dmin.testing import tiny_cogvideox_pipeline
from diffusers_dmin.video import decode_video
from diffusers_dmin.viz import influence_grid, influence_legend, to_pil


FRAMES, SIZE = 9, 32  # the tiny pipeline's `sample_frames`, and its resolution
PROMPTS = ["a photo of a cat", "a red square", "the digit three", "a blue circle"]
CONFIG = DMinConfig(num_timesteps=2, sketch_dim=256, resolution=(SIZE, SIZE))
# index rows are stored in float16, and batches of another size round differently: one float16 step apart at most
FP16 = dict(rtol=2e-3, atol=1e-5)


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def moving_square(i: int, frames: int = FRAMES) -> np.ndarray:
    """Video `i`: `(F, H, W, 3)` uint8, an 8x8 square moving over a plain background, colours and path per video (few
    colours, so a GIF stores it losslessly)."""
    video = np.zeros((frames, SIZE, SIZE, 3), dtype=np.uint8)
    video[..., 2] = 40 + 20 * i
    for f in range(frames):
        top, left = (2 * f + 3 * i) % (SIZE - 8), (3 * f + 5 * i) % (SIZE - 8)
        video[f, top : top + 8, left : left + 8] = (230, 60 + 40 * i, 30)
    return video


def pil_frames(video: np.ndarray) -> list[PIL.Image.Image]:
    return [PIL.Image.fromarray(frame) for frame in video]


def save_gif(video: np.ndarray, path) -> None:
    frames = pil_frames(video)
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=80, loop=0)


def as_tensor(videos: list[np.ndarray]) -> torch.Tensor:
    """`(B, F, C, H, W)` in `[0, 1]`, what the sketcher takes."""
    return torch.from_numpy(np.stack(videos)).permute(0, 1, 4, 2, 3).float() / 255.0


@pytest.fixture(scope="module")
def pipe():
    return tiny_cogvideox_pipeline()


@pytest.fixture(scope="module")
def expected(pipe):
    """The sketches of the 4 training videos, from the sketcher on the original tensors (the ground truth)."""
    sketcher = GradientSketcher.from_pipeline(pipe, CONFIG)
    sketcher.set_progress_bar_config(disable=True)
    return sketcher(images=as_tensor([moving_square(i) for i in range(4)]), prompts=PROMPTS)


def _rows(index: GradientIndex, ids=range(4)) -> torch.Tensor:
    return index.get_sketches(list(ids)).float()


def _build(pipe, dataset, folder, **kwargs):
    kwargs = {"image_column": "video", "batch_size": 2, "progress": False, **kwargs}
    return GradientIndex.build(pipe, dataset, CONFIG, folder, **kwargs)


def test_build_over_in_memory_videos_gives_the_sketchers_rows_and_self_retrieval(pipe, expected, tmp_path):
    """Lists of PIL frames (a `List(Image())` column) and `(F, H, W, C)` uint8 arrays (nested lists in Arrow) both
    give the sketches of the original videos; each video's own sketch ranks it first."""
    import datasets

    videos = [moving_square(i) for i in range(4)]
    as_frames = datasets.Dataset.from_dict({"video": [pil_frames(v) for v in videos], "text": PROMPTS})
    as_arrays = datasets.Dataset.from_dict({"video": videos, "text": PROMPTS})
    assert str(as_frames.features["video"]).startswith("List(Image")
    for number, dataset in enumerate((as_frames, as_arrays)):
        index = _build(pipe, dataset, tmp_path / f"index-{number}")
        assert len(index) == 4 and index.metadata.extra["columns"]["image"] == "video"
        torch.testing.assert_close(_rows(index), expected.to(torch.float16).float(), **FP16)
        results = index.search(expected, top_k=4)
        assert [int(r.sample_ids[0]) for r in results] == [0, 1, 2, 3]


def test_frames_are_resized_and_center_cropped_like_training_images(pipe, expected, tmp_path):
    """Frames 32x48 whose center 32x32 is the training video: the center crop (the scale is 1) gives back exactly
    the video's sketch; 64x96 frames (a 2x nearest upscale of those) are resized to nearly the same sketch."""
    import datasets

    wide = [np.pad(moving_square(i), ((0, 0), (0, 0), (8, 8), (0, 0)), constant_values=255) for i in range(2)]
    large = [v.repeat(2, axis=1).repeat(2, axis=2) for v in wide]
    dataset = datasets.Dataset.from_dict({"video": [pil_frames(v) for v in wide + large], "text": PROMPTS[:2] * 2})
    index = _build(pipe, dataset, tmp_path / "index")
    rows = _rows(index)
    torch.testing.assert_close(rows[:2], expected[:2].to(torch.float16).float(), **FP16)
    cosine = torch.nn.functional.cosine_similarity(rows[2:].flatten(1), expected[:2].flatten(1), dim=-1)
    assert cosine.min() > 0.9, cosine


def test_a_video_of_the_wrong_length_names_its_row_the_column_and_both_counts(pipe, expected, tmp_path):
    import datasets

    videos = [pil_frames(moving_square(i)) for i in range(3)]
    videos[1] = videos[1][:5]
    dataset = datasets.Dataset.from_dict({"id": [10, 11, 12], "video": videos, "text": PROMPTS[:3]})
    with pytest.raises(DatasetError) as raised:
        _build(pipe, dataset, tmp_path / "index", id_column="id")
    message = str(raised.value)
    assert "id 11" in message and "column 'video'" in message, message
    assert "has 5 frame(s)" in message and "exactly 9 frames" in message, message
    index = _build(pipe, dataset, tmp_path / "index", id_column="id", on_error="skip", resume=False)
    assert index.ids.tolist() == [10, 12]
    assert [r["id"] for r in index.metadata.extra["skipped"]] == [11]
    torch.testing.assert_close(_rows(index, [10, 12]), expected[[0, 2]].to(torch.float16).float(), **FP16)


def test_decode_video_reads_gifs_frame_folders_dataset_values_and_arrays(tmp_path):
    video = moving_square(1)
    save_gif(video, tmp_path / "clip.gif")
    folder = tmp_path / "frames"
    folder.mkdir()
    for f, frame in enumerate(pil_frames(video)):
        frame.save(folder / f"{f + 5}.png")  # 5.png .. 13.png: "10.png" sorts before "5.png" as plain text
    (folder / "notes.txt").write_text("not a frame")
    gif_bytes = (tmp_path / "clip.gif").read_bytes()
    forms = {
        "gif path (relative to image_root)": decode_video("clip.gif", tmp_path),
        "frame folder": decode_video(folder),
        "datasets.Image value (bytes)": decode_video({"bytes": gif_bytes, "path": None}),
        "datasets.Image value (path)": decode_video({"bytes": None, "path": "clip.gif"}, tmp_path),
        "opened animated image": decode_video(PIL.Image.open(tmp_path / "clip.gif")),
        "nested lists of ints": decode_video(video.tolist()),
        "list of frame paths": decode_video([f"frames/{f + 5}.png" for f in range(FRAMES)], tmp_path),
    }
    for form, frames in forms.items():
        assert len(frames) == FRAMES, form
        array = np.stack([np.asarray(f.convert("RGB")) / 255.0 if hasattr(f, "convert") else f for f in frames])
        np.testing.assert_allclose(array, video / 255.0, atol=1e-6, err_msg=form)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no frame images"):
        decode_video(tmp_path / "empty")
    with pytest.raises(ValueError, match="missing"):
        decode_video(None)
    (tmp_path / "clip.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(64))
    with pytest.raises(ValueError, match="extract the frames"):
        decode_video(tmp_path / "clip.mp4")


def test_first_frames_in_grids_and_the_legend_says_so():
    video = moving_square(2)
    torch.testing.assert_close(
        torch.from_numpy(np.array(to_pil(pil_frames(video)))),
        torch.from_numpy(video[0]),
    )
    legend = influence_legend(2, video=True)
    assert "first frame of the query video" in legend and "first frames of the training videos" in legend
    assert "first frame" not in influence_legend(2)


def test_dmin_build_and_search_over_gifs_and_a_frame_folder(pipe, expected, tmp_path, capsys):
    """`dmin build --image-column video` over a metadata.jsonl of GIFs and one folder of PNG frames, and the same
    GIFs as an image folder; `dmin search` with the GIFs (and the folder) as queries ranks each video first and
    draws the grid the Python API draws from the first frames."""
    pipe.save_pretrained(tmp_path / "pipe")
    data = tmp_path / "videos"
    data.mkdir()
    names = ["0.gif", "1.gif", "2.gif", "clip3"]
    for i, name in enumerate(names[:3]):
        save_gif(moving_square(i), data / name)
    (data / "clip3").mkdir()
    for f, frame in enumerate(pil_frames(moving_square(3))):
        frame.save(data / "clip3" / f"frame{f:02d}.png")
    rows = "".join(json.dumps({"video": name, "text": text}) + "\n" for name, text in zip(names, PROMPTS))
    (data / "train.jsonl").write_text(rows)
    index_dir = tmp_path / "index"
    common = ["--num-timesteps", "2", "--sketch-dim", "256", "--resolution", str(SIZE), "--batch-size", "2", "-q"]

    code = main(["build", str(tmp_path / "pipe"), "--dataset", str(data / "train.jsonl"), "--image-column", "video",
                 "--output-dir", str(index_dir), *common])  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 0, err
    index = GradientIndex.from_pretrained(index_dir)
    torch.testing.assert_close(_rows(index), expected.to(torch.float16).float(), **FP16)

    # the GIFs as an image folder (metadata.jsonl with file_name): its "image" column holds the animated files
    folder = tmp_path / "gif-folder"
    folder.mkdir()
    for i, name in enumerate(names[:3]):
        (folder / name).write_bytes((data / name).read_bytes())
    meta = "".join(json.dumps({"file_name": n, "text": t}) + "\n" for n, t in zip(names[:3], PROMPTS))
    (folder / "metadata.jsonl").write_text(meta)
    code = main(["build", str(tmp_path / "pipe"), "--dataset", str(folder), "--output-dir", str(tmp_path / "idx2"),
                 *common])  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 0, err
    torch.testing.assert_close(
        _rows(GradientIndex.from_pretrained(tmp_path / "idx2"), range(3)), _rows(index, range(3)), **FP16
    )

    grid = tmp_path / "grid.png"
    queries = [str(data / name) for name in names]
    code = main(["search", str(index_dir), "--pipeline", str(tmp_path / "pipe"), "--image", *queries, "--prompt",
                 *PROMPTS, "--top-k", "2", "--dataset", str(data / "train.jsonl"), "--thumb-size", "32",
                 "--output", str(grid)])  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "training images unavailable" not in err
    lines = out.splitlines()
    firsts = [lines[n + 2].split() for n, line in enumerate(lines) if line.startswith("query ")]
    assert [(int(row[0]), int(row[1])) for row in firsts] == [(1, 0), (1, 1), (1, 2), (1, 3)], out

    # the grid is the Python API's grid of the same search: first frames of the queries and of the training videos
    wrapped = InfluencePipeline(pipe, index)
    results = wrapped.attribute(as_tensor([moving_square(i) for i in range(4)]), prompts=PROMPTS, top_k=2)
    thumbs = [[pil_frames(moving_square(int(i)))[0] for i in r.sample_ids] for r in results]
    drawn = influence_grid(results, images=thumbs, thumb_size=32, video=True)
    np.testing.assert_array_equal(np.asarray(PIL.Image.open(grid).convert("RGB")), np.asarray(drawn))

    save_gif(moving_square(0, frames=5), tmp_path / "short.gif")
    code = main(["search", str(index_dir), "--pipeline", str(tmp_path / "pipe"), "--image", str(tmp_path / "short.gif"),
                 "--prompt", "a cat", "--output", str(grid), "--no-dataset", "-q"])  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 2 and err.count("\n") == 1, err
    assert "short.gif" in err and "has 5 frame(s)" in err and "exactly 9 frames" in err, err
