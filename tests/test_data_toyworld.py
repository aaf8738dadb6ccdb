from dataclasses import replace

import numpy as np
import pytest
import torch

from labkit.data import toyworld as tw
from labkit.data.bench import bench_toyworld


def test_deterministic_by_split_seed_index():
    a, b = tw.ToyWorld("train", 3, 100, caption_drop=0.2), tw.ToyWorld("train", 3, 100, caption_drop=0.2)
    for i in (0, 17, 99):
        assert np.array_equal(a.scene(i).render(), b.scene(i).render())
        assert a.caption(i) == b.caption(i)
    other_seed, other_split = tw.ToyWorld("train", 4, 100), tw.ToyWorld("val", 3, 100)
    assert not np.array_equal(a.scene(0).render(), other_seed.scene(0).render())
    assert not np.array_equal(a.scene(0).render(), other_split.scene(0).render())


def test_scene_geometry_and_dataset_item():
    world = tw.ToyWorld("train", 0, 300)
    for i in range(300):
        scene = world.scene(i)
        assert 1 <= len(scene.objects) <= 3
        positions = [o.position for o in scene.objects]
        assert len(set(positions)) == len(positions)
        for j, a in enumerate(scene.objects):
            for b in scene.objects[j + 1:]:  # non-overlapping: centres further apart than the radii
                assert np.hypot(a.cx - b.cx, a.cy - b.cy) > tw.SIZES[a.size] + tw.SIZES[b.size]
    item = world[5]
    assert item["image"].dtype == torch.uint8 and item["image"].shape == (3, 64, 64)
    assert isinstance(item["caption"], str) and item["caption"]


def test_object_pixels_have_the_object_colour():
    scene = tw.ToyWorld("train", 0, 10, objects=(1, 1)).scene(0)
    obj = scene.objects[0]
    image = scene.render()
    assert np.array_equal(image[round(obj.cy), round(obj.cx)], tw.COLORS[obj.color]) or obj.shape == "ring"


def test_canonical_caption_names_every_object():
    world = tw.ToyWorld("test", 0, 50, canonical_captions=True)
    for i in range(50):
        scene, caption = world.scene(i), world.caption(i)
        for o in scene.objects:
            assert f"{o.size} {o.color} {o.shape} at the {o.position}" in caption


def test_caption_variety_and_synonyms():
    world = tw.ToyWorld("train", 0, 400)
    captions = [world.caption(i) for i in range(400)]
    assert len({c.split(" a ")[0] for c in captions}) >= 4  # several templates
    text = " ".join(captions)
    for synonym in ("big", "little", "upper", "lower"):
        assert synonym in text


def test_novel_shapes_never_in_pretraining_captions():
    world = tw.ToyWorld("train", 0, 2000, caption_drop=0.2)
    text = " ".join(world.caption(i) for i in range(2000))
    assert not any(shape in text for shape in tw.NOVEL_SHAPES)
    novel = tw.ToyWorld("novel", 0, 200)
    assert all(o.shape in tw.NOVEL_SHAPES for i in range(200) for o in novel.scene(i).objects)


def test_shifted_split_has_textured_backgrounds():
    shifted, plain = tw.ToyWorld("shifted", 0, 50, objects=(1, 1)), tw.ToyWorld("test", 0, 50, objects=(1, 1))
    assert all(shifted.scene(i).texture != "plain" for i in range(50))
    colours = lambda w, i: len(np.unique(replace(w.scene(i), objects=()).render().reshape(-1, 3), axis=0))
    assert all(colours(plain, i) == 1 for i in range(50))
    assert all(colours(shifted, i) > 1 for i in range(50))


@pytest.mark.parametrize("vary, kept", [("shape", ("color", "size", "position", "cx", "cy")),
                                         ("color", ("shape", "size", "position", "cx", "cy"))])
def test_hard_negative_group_differs_only_in_one_attribute(vary, kept):
    group = tw.ToyWorld("train", 0, 100).hard_negative_group(7, n=4, vary=vary)
    assert len(group) == 4
    base = group[0]
    assert len({tuple(getattr(o, vary) for o in s.objects) for s in group}) == 4
    for scene in group[1:]:
        assert (scene.background, scene.texture, scene.texture_seed) == (base.background, base.texture, base.texture_seed)
        for a, b in zip(scene.objects, base.objects):
            assert [getattr(a, k) for k in kept] == [getattr(b, k) for k in kept]


def test_hard_negative_group_rejects_unknown_attribute():
    with pytest.raises(ValueError, match="vary must be 'shape' or 'color'"):
        tw.ToyWorld("train", 0, 100).hard_negative_group(7, vary="size")


def test_questions_have_correct_answers():
    world = tw.ToyWorld("train", 1, 100)
    for i in range(100):
        scene = world.scene(i)
        for question, answer in scene.questions():
            if question.startswith("what color is the "):
                shape = question.removeprefix("what color is the ").rstrip("?")
                assert [o.color for o in scene.objects if o.shape == shape] == [answer]
            elif question.startswith("how many"):
                assert answer == tw.COUNT_WORDS[len(scene.objects) - 1]


@pytest.mark.parametrize("task", ["shape", "color", "count", "position"])
def test_class_tasks(task):
    data = tw.TaskDataset(task, "test", 0, 60)
    images, labels = data.tensors()
    assert images.shape == (60, 3, 64, 64) and labels.min() >= 0 and labels.max() < len(data.task.classnames)
    assert len(set(labels.tolist())) > 1


def test_novel_task_uses_novel_classes():
    assert tw.class_task("shape", "novel").classnames == tw.NOVEL_SHAPES


def test_bad_input_is_rejected():
    with pytest.raises(ValueError, match="unknown ToyWorld split 'nope'"):
        tw.ToyWorld("nope")
    with pytest.raises(ValueError, match="image_size"):
        tw.ToyWorld("train", image_size=8)
    with pytest.raises(ValueError, match="objects"):
        tw.ToyWorld("train", objects=(0, 4))
    with pytest.raises(ValueError, match="unknown ToyWorld task"):
        tw.class_task("texture")
    with pytest.raises(IndexError):
        tw.ToyWorld("train", 0, 5).scene(5)


def test_rendering_is_far_faster_than_training():
    result = bench_toyworld(n=300, repeats=1)
    assert result["images_per_s"] > 5 * result["training_images_per_s"]


@pytest.mark.parametrize("task", ["shape", "novel", "shifted", "mnist"])
def test_support_validation_and_test_draws_of_a_task_share_no_image(task):
    """Alpha/beta are chosen on validation and reported on test: the three draws must be disjoint."""
    import hashlib

    from labkit.tipadapter.eval import task_data

    draws = {role: {hashlib.sha1(image.numpy().tobytes()).hexdigest() for image in task_data(task, role, 300)[0]}
             for role in ("support", "val", "test")}
    assert all(len(d) == 300 for d in draws.values())  # no repeats inside a draw either
    assert not draws["support"] & draws["val"] and not draws["support"] & draws["test"] and not draws["val"] & draws["test"]
