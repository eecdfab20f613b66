"""Real code paths of the model-based adapters on tiny random models saved to disk and loaded back by path,
checked against independent computations through the models' own forward passes."""

import pytest
import torch

from tests.rewards._tiny import save_tiny_git, save_tiny_grounding_dino, save_tiny_llava_onevision


@pytest.fixture(scope="module")
def gdino_dir(tmp_path_factory):
    return save_tiny_grounding_dino(str(tmp_path_factory.mktemp("gdino")))


@pytest.fixture(scope="module")
def git_dir(tmp_path_factory):
    return save_tiny_git(str(tmp_path_factory.mktemp("git")))


@pytest.fixture(scope="module")
def orm_dir(tmp_path_factory):
    return save_tiny_llava_onevision(str(tmp_path_factory.mktemp("orm")))


def test_grounding_dino_detector_matches_manual_phrase_scores(gdino_dir):
    from transformers import AutoProcessor, GroundingDinoForObjectDetection

    from egrpo.rewards.base import to_pil
    from egrpo.rewards.grounding_dino import GroundingDinoDetector, detection_prompt

    images = torch.rand(2, 3, 40, 56)
    phrases = [["cat", "red car"], ["dog"]]
    detector = GroundingDinoDetector(gdino_dir, box_threshold=0.0, batch_size=1)
    found = detector(images, phrases)
    processor = AutoProcessor.from_pretrained(gdino_dir)
    model = GroundingDinoForObjectDetection.from_pretrained(gdino_dir).eval()
    for b in range(2):
        text, _ = detection_prompt(phrases[b])
        assert text == ("cat . red car ." if b == 0 else "dog .")
        inputs = processor(images=to_pil(images[b:b + 1]), text=[text], return_tensors="pt")
        with torch.no_grad():
            out = model(**inputs)
        tokens = processor.tokenizer.convert_ids_to_tokens(inputs["input_ids"][0])
        probs = out.logits[0].sigmoid()
        for phrase in phrases[b]:
            # token positions of the phrase's words, located by token text (independent of offsets)
            words = phrase.split()
            start = next(i for i in range(len(tokens)) if tokens[i:i + len(words)] == words)
            expected = probs[:, start:start + len(words)].mean(-1)
            got = sorted(d.score for d in found[b] if d.label == phrase)
            assert len(got) == model.config.num_queries            # threshold 0: every query is a detection
            torch.testing.assert_close(torch.tensor(got), expected.sort().values, rtol=1e-5, atol=1e-6)
        for d in found[b]:
            assert all(0.0 <= c <= 1.0 for c in d.box) and d.box[0] <= d.box[2] and d.box[1] <= d.box[3]
    assert GroundingDinoDetector(gdino_dir, box_threshold=1.0)(images, phrases) == [[], []]


def test_grounding_dino_reward_and_geneval_run_from_path(gdino_dir):
    from egrpo.rewards.geneval import GradedGenEvalReward
    from egrpo.rewards.grounding_dino import GroundingDinoReward

    images = torch.rand(3, 3, 48, 48)
    meta = [dict(nouns=["cat", "dog"]), dict(nouns=[]),
            dict(nouns=["cat"], task_type="numeracy", numeracy_info=[dict(num=2, obj_name="cat")])]
    # threshold 0: every query matches every phrase -> all nouns present; 30 boxes after NMS != 2 cats -> 0.2
    loose = GroundingDinoReward(path=gdino_dir, box_threshold=0.0)(images, ["p"] * 3, meta)
    assert loose[0] == 1.0 and loose[1] == 1.0 and abs(loose[2] - 0.2) < 1e-6
    strict = GroundingDinoReward(path=gdino_dir, box_threshold=0.0, strict=True)(images, ["p"] * 3, meta)
    assert strict[0] == 0.0 and strict[1] == 1.0                 # 30 duplicates of each noun cancel its share
    none = GroundingDinoReward(path=gdino_dir, box_threshold=1.0)(images, ["p"] * 3, meta)
    assert none.tolist() == [0.0, 1.0, 0.0]
    geneval = GradedGenEvalReward(detector_path=gdino_dir, box_threshold=1.0)
    absent = geneval(images, ["p"] * 3, [dict(tag="single_object", include=[{"class": "cat"}])] * 3)
    assert absent.tolist() == [0.0, 0.0, 0.0]
    excluded = geneval(images, ["p"] * 3, [dict(tag="counting", include=[{"class": "cat", "count": 1}],
                                                 exclude=[{"class": "cat", "count": 2}])] * 3)
    assert excluded.tolist() == [0.5, 0.5, 0.5]


def test_git_vqa_batched_equals_single_unpadded_forward(git_dir):
    from transformers import AutoTokenizer, CLIPImageProcessor, GitForCausalLM

    from egrpo.rewards.base import to_pil
    from egrpo.rewards.git_vqa import GitVQAReward

    images = torch.rand(4, 3, 40, 40)
    meta = [dict(attr_nouns=["red cat", "dog"]), dict(task_type="spatial", nouns=["cat"]), dict(),
            dict(attr_nouns=["blue ball on the left of a yellow car"])]
    reward = GitVQAReward(path=git_dir, batch_size=3)
    got = reward(images, ["p"] * 4, meta)
    tokenizer, processor = AutoTokenizer.from_pretrained(git_dir), CLIPImageProcessor.from_pretrained(git_dir)
    model = GitForCausalLM.from_pretrained(git_dir).eval()
    yes, no = tokenizer.convert_tokens_to_ids("yes"), tokenizer.convert_tokens_to_ids("no")

    def p_yes(image, question):
        ids = [tokenizer.cls_token_id] + tokenizer(question, add_special_tokens=False)["input_ids"]
        pixels = processor(images=to_pil(image[None]), return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            probs = model(input_ids=torch.tensor([ids]), pixel_values=pixels).logits[0, -1].softmax(-1)
        return float(probs[yes] / (probs[yes] + probs[no]))

    expected = [(p_yes(images[0], "red cat?") + p_yes(images[0], "dog?")) / 2, 0.0, 1.0,
                p_yes(images[3], "blue ball on the left of a yellow car?")]
    torch.testing.assert_close(got, torch.tensor(expected), rtol=1e-4, atol=1e-5)
    assert 0 < got[0] < 1 and got[0] != got[3]


def test_orm_left_padded_batch_equals_model_own_forward(orm_dir):
    from transformers import AutoTokenizer, LlavaOnevisionForConditionalGeneration, LlavaOnevisionImageProcessor

    from egrpo.rewards.base import to_pil
    from egrpo.rewards.orm import CONVERSATION, QUESTION, ORMReward

    images = torch.rand(3, 3, 48, 40)
    prompts = ["a red cat", "two dogs on the left of a blue car and a yellow ball", "a dog"]
    reward = ORMReward(path=orm_dir, temperature=0.3)
    got = reward(images, prompts, None)
    tokenizer, processor = AutoTokenizer.from_pretrained(orm_dir), LlavaOnevisionImageProcessor.from_pretrained(orm_dir)
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(orm_dir).eval()
    yes, no = tokenizer.convert_tokens_to_ids("yes"), tokenizer.convert_tokens_to_ids("no")
    image_id = model.config.image_token_id
    for i, prompt in enumerate(prompts):
        inputs = processor(images=to_pil(images[i:i + 1]), return_tensors="pt")
        with torch.no_grad():
            n_features = model.model.get_image_features(
                inputs["pixel_values"], inputs["image_sizes"], vision_feature_layer=model.config.vision_feature_layer,
                vision_feature_select_strategy=model.config.vision_feature_select_strategy,
                return_dict=True).pooler_output[0].shape[0]
        ids = tokenizer(CONVERSATION.format(question=QUESTION.format(prompt=prompt)).replace(
            "<image>", "<image>" * n_features), add_special_tokens=False)["input_ids"]
        assert ids.count(image_id) == n_features
        with torch.no_grad():   # the model's own placeholder filling (masked_scatter inside forward)
            logits = model(input_ids=torch.tensor([ids]), pixel_values=inputs["pixel_values"],
                           image_sizes=inputs["image_sizes"]).logits[0, -1] / 0.3
        probs = logits.softmax(-1)
        torch.testing.assert_close(got[i], probs[yes] / (probs[yes] + probs[no]), rtol=1e-4, atol=1e-5)


def test_offload_and_back(git_dir):
    from egrpo.rewards.git_vqa import GitVQAReward

    reward = GitVQAReward(path=git_dir, offload_between_calls=True)
    images = torch.rand(1, 3, 32, 32)
    before = reward(images, ["p"], [dict(nouns=["cat"])])
    assert next(reward.model.parameters()).device.type == "cpu"
    reward.offload().to("cpu")
    assert not reward.model.training and not any(p.requires_grad for p in reward.model.parameters())
    torch.testing.assert_close(reward(images, ["p"], [dict(nouns=["cat"])]), before)


def test_missing_local_path_is_a_clear_error(tmp_path):
    from egrpo.rewards.git_vqa import GitVQAReward
    from egrpo.rewards.orm import ORMReward

    with pytest.raises(FileNotFoundError, match="does not exist"):
        GitVQAReward(path=str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="local path"):
        ORMReward(path=None)
