"""Study spec: loading, enumeration and validation against the data (ablate/spec.py)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
from study_fixtures import write_manifest_dir

from megablocks_ablate.ablate.mixtures import Mixture
from megablocks_ablate.ablate.runner import resolve
from megablocks_ablate.ablate.spec import StudySpec, describe_plan
from megablocks_ablate.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
PARTS = {"bio": 3, "cs": 1, "math": 2, "phys": 1}


@pytest.fixture()
def data_dir(tmp_path) -> str:
    """A minimal preprocess output: manifest + held-out files (no unit data needed)."""
    d = write_manifest_dir(tmp_path / "data", PARTS)
    (tmp_path / "paloma").mkdir()
    (tmp_path / "paloma" / "c4_en.jsonl").write_text('{"text": "c4"}\n')
    (tmp_path / "paloma" / "wiki.jsonl").write_text('{"text": "wiki"}\n')
    return str(d)


def spec(data_dir: str, **over) -> StudySpec:
    base = {
        "data": data_dir,
        "out_dir": os.path.join(data_dir, "..", "study"),
        "seed": {"config": "tiny_seed"},
        "unit": {"config": "tiny_unit"},
        "mixtures": {"k_subsets": 2},
    }
    base.update(over)
    return StudySpec.from_dict(base)


def test_defaults_partitions_mixtures_eval(data_dir):
    study = resolve(spec(data_dir))
    assert study.partitions == {
        "bio": ["bio-0000", "bio-0001", "bio-0002"],
        "cs": ["cs-0000"],
        "math": ["math-0000", "math-0001"],
        "phys": ["phys-0000"],
    }
    assert len(study.mixtures) == 6 and all(m.k == 2 for m in study.mixtures)
    assert study.mixtures[0] == Mixture.of({"bio": study.partitions["bio"], "cs": ["cs-0000"]})
    assert list(study.eval_sets) == ["bio", "cs", "math", "phys"]
    assert study.domain_units["math"] == ["math-0000", "math-0001"]
    assert study.validation == []
    assert study.unit_tokens > 0 and study.cost.units_trained == 7
    assert study.unit_paths["cs-0000"].endswith(os.path.join("units", "cs-0000"))
    text = describe_plan(study)
    assert "mixtures: 6" in text and "bio+cs" in text


def test_grouped_partitions_unit_partitions_and_forms(data_dir):
    s = spec(
        data_dir,
        partitions={"life": ["bio", "cs-0000"], "exact": ["math", "phys-0000"]},
        mixtures={"explicit": [["life"], ["exact", "life"]], "k_subsets": 2},
    )
    study = resolve(s)
    assert study.partitions["life"] == ["bio-0000", "bio-0001", "bio-0002", "cs-0000"]
    assert len(study.mixtures) == 2  # explicit [exact, life] == the one 2-subset
    study = resolve(spec(data_dir, unit_partitions=True, mixtures={"k_subsets": 1}))
    assert len(study.partitions) == 7 and len(study.mixtures) == 7
    study = resolve(
        spec(
            data_dir,
            mixtures={
                "leave_one_out": ["bio", "cs", "math"],
                "add_one": ["bio"],
                "random": {"k": 3, "n": 2},
            },
        )
    )
    labels = [m.label for m in study.mixtures]
    assert {"bio+cs+math", "cs+math", "bio+math", "bio+cs"} <= set(labels)  # leave-one-out
    assert {"bio", "bio+phys"} <= set(labels)  # add-one
    assert len(labels) == len(set(labels))  # deduplicated


def test_validation_and_extra_eval_sets(data_dir):
    paloma = os.path.join(data_dir, "..", "paloma")
    s = spec(
        data_dir,
        eval={"heldout": ["bio", "cs"], "extra": [paloma]},
        validation={
            "mixtures": [["cs", "bio"]],
            "n": 2,
            "seed": 3,
            "train": {"config": "tiny_seq"},
            "model": "tiny",
        },
    )
    study = resolve(s)
    assert list(study.eval_sets) == ["bio", "cs", "c4_en", "wiki"]
    assert study.validation[0].label == "bio+cs" and len(study.validation) == 3
    assert resolve(s).validation == study.validation  # seeded draw
    assert study.cost.seq_validation_tokens == sum(study.seq_tokens(m) for m in study.validation)


@pytest.mark.parametrize(
    "over, match",
    [
        (
            {"partitions": {"life": ["bio", "nope"]}},
            r"partitions\.life: unknown unit or partition 'nope'",
        ),
        (
            {"partitions": {"a": ["bio"], "b": ["bio-0001"]}},
            r"unit 'bio-0001' is listed in both a and b",
        ),
        (
            {"mixtures": {"k_subsets": 5}},
            r"mixtures\.k_subsets: k=5 is larger than the number of partitions \(4",
        ),
        ({"mixtures": {"random": {"k": 9, "n": 2}}}, r"mixtures\.random\.k: k=9 is larger"),
        ({"mixtures": {"explicit": [["bio"], []]}}, r"mixtures\.explicit\[1\]: empty mixture"),
        (
            {"mixtures": {"explicit": [["bio", "chem"]]}},
            r"mixtures\.explicit\[0\]: unknown partition 'chem'",
        ),
        (
            {"eval": {"extra": ["/no/such/eval.jsonl"]}},
            r"eval\.extra\[0\]: no such file or directory",
        ),
        ({"eval": {"heldout": ["chem"]}}, r"eval\.heldout: unknown partition 'chem'"),
        (
            {"validation": {"mixtures": [["bio", "cs", "math"]], "train": {"config": "tiny_seq"}}},
            r"validation\.mixtures\[0\]: \['bio', 'cs', 'math'\] is not among the study's mixtures",
        ),
        ({"validation": {"n": 99, "train": {"config": "tiny_seq"}}}, r"validation\.n: 99"),
        ({"unit": {"config": "no_such_preset"}}, r"unit\.config: train preset 'no_such_preset'"),
    ],
)
def test_errors_name_the_field(data_dir, over, match):
    with pytest.raises(ConfigError, match=match):
        resolve(spec(data_dir, **over))


def test_missing_heldout_file_and_bad_data(data_dir, tmp_path):
    os.remove(os.path.join(data_dir, "heldout", "cs.jsonl"))
    with pytest.raises(
        ConfigError, match="eval.heldout: held-out file of partition 'cs' is missing"
    ):
        resolve(spec(data_dir))
    with pytest.raises(ConfigError, match="^data: .*manifest not found"):
        resolve(spec(str(tmp_path / "nowhere")))


def test_spec_level_checks_and_round_trip(data_dir, tmp_path):
    with pytest.raises(ConfigError, match="seed.checkpoint or seed.config, not both"):
        spec(data_dir, seed={"checkpoint": "a", "config": "b"})
    with pytest.raises(ConfigError, match="proxies"):
        spec(data_dir, proxies=["merged", "soup"])
    with pytest.raises(ConfigError, match="mixtures: give at least one"):
        spec(data_dir, mixtures={})
    with pytest.raises(ConfigError, match="validation.train.config: required"):
        spec(data_dir, validation={"n": 1})
    s = spec(data_dir, proxies=["merged", "mean_ind"])
    path = tmp_path / "study.yaml"
    s.save(path)
    again = StudySpec.load(path, ["mixtures.k_subsets=3", "name=x"])
    assert again.mixtures.k_subsets == 3 and again.name == "x" and again.proxies == s.proxies
    assert StudySpec.load(path).to_dict() == s.to_dict()


def test_shipped_study_specs_parse():
    specs = sorted((REPO / "configs" / "studies").glob("*.yaml"))
    assert specs, "configs/studies/ has no example spec"
    for p in specs:
        StudySpec.load(p)


def test_study_plan_command(data_dir, tmp_path, capsys):
    import argparse

    from megablocks_ablate.commands import study

    path = tmp_path / "s.yaml"
    spec(data_dir).save(path)
    parser = argparse.ArgumentParser()
    study.register(parser.add_subparsers())
    args = parser.parse_args(["study", "plan", str(path), "mixtures.k_subsets=3"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "mixtures: 4" in out and "cost:" in out and "bio+cs+math" in out
    args = parser.parse_args(["study", "plan", str(path), "mixtures.k_subsets=9"])
    with pytest.raises(ConfigError, match="k=9 is larger"):
        args.func(args)


def _paloma_copy(root) -> str:
    """The miniature published-layout Paloma of tests/evaluate/paloma_layout.py."""
    import sys

    sys.path.insert(0, str(REPO / "tests" / "evaluate"))
    from paloma_layout import write_paloma

    os.makedirs(root, exist_ok=True)
    return write_paloma(str(root), [f"document {i}" for i in range(30)])


def test_paloma_domains_join_eval_sets_out_of_domain(data_dir, tmp_path, capsys):
    from megablocks_ablate.evaluate import paloma

    pal = _paloma_copy(tmp_path / "hf")
    s = spec(
        data_dir,
        eval={
            "paloma": {"dir": pal, "split_by": "subdomain", "sources": ["c4_100_domains", "ptb"]}
        },
    )
    study = resolve(s)
    new = ["c4_100_domains/www.ign.com", "c4_100_domains/www.nytimes.com", "ptb"]
    assert list(study.eval_sets) == ["bio", "cs", "math", "phys"] + new
    assert study.eval_sets["ptb"] == "paloma:" + os.path.join(pal, "ptb", "val")
    assert list(study.domain_units) == ["bio", "cs", "math", "phys"]  # Paloma: OOD for all
    srcs = paloma.sources_from_refs({d: study.eval_sets[d] for d in new})
    assert srcs["c4_100_domains/www.ign.com"].where == ("subdomain", "www.ign.com")
    assert "c4_100_domains/www.ign.com" in describe_plan(study)
    # the override form of docs/evaluation.md, and the test split
    path = tmp_path / "s.yaml"
    spec(data_dir).save(path)
    study = resolve(StudySpec.load(path, [f"eval.paloma.dir={pal}", "eval.paloma.split=test"]))
    assert list(study.eval_sets)[4:] == ["c4_100_domains", "c4_en", "m2d2_s2orc_unsplit", "ptb"]
    assert study.eval_sets["c4_en"].endswith(os.path.join("c4_en", "test"))


def test_extra_named_like_a_partition_or_mapped_is_in_domain(data_dir, tmp_path):
    paloma_flat = os.path.join(data_dir, "..", "paloma")
    wiki = os.path.join(paloma_flat, "wiki.jsonl")
    s = spec(
        data_dir,
        eval={
            "heldout": ["bio", "cs"],
            "extra": [f"math={os.path.join(paloma_flat, 'c4_en.jsonl')}", wiki],
            "in_domain": {"wiki": "phys"},
        },
    )
    study = resolve(s)
    assert list(study.eval_sets) == ["bio", "cs", "math", "wiki"]
    assert study.domain_units == {
        "bio": ["bio-0000", "bio-0001", "bio-0002"],
        "cs": ["cs-0000"],
        "math": ["math-0000", "math-0001"],  # named like the partition
        "wiki": ["phys-0000"],  # eval.in_domain
    }
    # study partitions (not manifest ones) are what an extra's name is matched against
    s = spec(
        data_dir,
        partitions={"life": ["bio", "cs-0000"], "exact": ["math", "phys-0000"]},
        mixtures={"explicit": [["life"], ["exact"]]},
        eval={"heldout": False, "extra": [f"life={wiki}"]},
    )
    assert resolve(s).domain_units == {"life": ["bio-0000", "bio-0001", "bio-0002", "cs-0000"]}


@pytest.mark.parametrize(
    "ev, match",
    [
        ({"paloma": {"split": "test"}}, r"eval\.paloma: dir: required"),
        ({"paloma": {"dir": "/no/such/paloma"}}, r"eval\.paloma: /no/such/paloma: no such Paloma"),
        (
            {"paloma": {"dir": "PAL", "sources": ["c4"]}},
            r"eval\.paloma: .*unknown Paloma source 'c4' \(available: c4_100_domains, c4_en",
        ),
        ({"paloma": {"dir": "PAL", "split": "dev"}}, r"eval\.paloma\.split: expected one of"),
        (
            {"extra": ["c4_en=FLAT/c4_en.jsonl"], "paloma": {"dir": "PAL"}},
            r"eval\.paloma: domain 'c4_en' is already taken",
        ),
        (
            {"extra": ["FLAT/wiki.jsonl"], "in_domain": {"wiki": "chem"}},
            r"eval\.in_domain\.wiki: unknown partition 'chem' \(partitions: bio, cs, math, phys\)",
        ),
        ({"in_domain": {"bio": "cs"}}, r"eval\.in_domain\.bio: 'bio' is a held-out set"),
        (
            {"paloma": {"dir": "PAL", "sources": ["ptb"]}, "in_domain": {"ptb": "cs"}},
            r"eval\.in_domain\.ptb: 'ptb' is a Paloma domain \(out-of-domain for every mixture\)",
        ),
        ({"in_domain": {"nope": "cs"}}, r"eval\.in_domain\.nope: 'nope' is not an evaluation"),
    ],
)
def test_paloma_and_role_errors_name_the_field(data_dir, tmp_path, ev, match):
    pal = _paloma_copy(tmp_path / "hf")
    flat = os.path.join(data_dir, "..", "paloma")

    def fill(v):
        if isinstance(v, dict):
            return {k: fill(x) for k, x in v.items()}
        if isinstance(v, list):
            return [fill(x) for x in v]
        return v.replace("PAL", pal).replace("FLAT", flat) if isinstance(v, str) else v

    with pytest.raises(ConfigError, match=match):
        resolve(spec(data_dir, eval=fill(ev)))


def test_a_paloma_source_named_id_is_refused(data_dir, tmp_path):
    pal = _paloma_copy(tmp_path / "hf")
    os.rename(os.path.join(pal, "ptb"), os.path.join(pal, "ID"))
    with pytest.raises(ConfigError, match=r"eval\.paloma: domain name 'ID' is reserved"):
        resolve(spec(data_dir, eval={"paloma": {"dir": pal, "sources": ["ID"]}}))


def _add_unit_heldout(data_dir: str, units: dict[str, str | None]) -> None:
    """Give the fixture manifest per-unit held-out sets (unit -> text, None: no file)."""
    path = os.path.join(data_dir, "manifest.json")
    with open(path) as f:
        manifest = json.load(f)
    os.makedirs(os.path.join(data_dir, "heldout", "units"), exist_ok=True)
    for u, info in manifest["units"].items():
        text = units.get(u, f"{u} own text")
        if text is None:
            info["heldout"] = None
            continue
        rel = f"heldout/units/{u}.jsonl"
        with open(os.path.join(data_dir, rel), "w") as f:
            f.write(json.dumps({"text": text}) + "\n")
        info["heldout"] = {"path": rel, "documents": 1}
    with open(path, "w") as f:
        json.dump(manifest, f)


def test_unit_partitions_are_evaluated_on_their_own_heldout_sets(data_dir):
    """Paper §5.1: when units are the partitions, each one's in-domain set is its own."""
    _add_unit_heldout(data_dir, {})
    study = resolve(spec(data_dir, unit_partitions=True, mixtures={"k_subsets": 1}))
    assert set(study.eval_sets) == set(study.partitions)  # one domain per unit
    assert study.eval_sets["bio-0001"].endswith(os.path.join("heldout", "units", "bio-0001.jsonl"))
    assert study.domain_units == {u: [u] for u in study.partitions}
    # grouped partitions keep the partition's set unless asked
    study = resolve(spec(data_dir))
    assert set(study.eval_sets) == set(PARTS)
    assert study.domain_units["bio"] == ["bio-0000", "bio-0001", "bio-0002"]
    study = resolve(spec(data_dir, eval={"heldout_by": "unit", "heldout": ["bio"]}))
    assert set(study.eval_sets) == {"bio-0000", "bio-0001", "bio-0002"}


def test_unit_heldout_missing_is_an_error_or_falls_back_for_old_manifests(data_dir, caplog):
    # an old manifest (no per-unit sets): auto keeps the partition's set, with a warning
    study = resolve(spec(data_dir, unit_partitions=True, mixtures={"k_subsets": 1}))
    assert set(study.eval_sets) == set(PARTS)
    assert "no per-unit held-out sets" in caplog.text
    with pytest.raises(ConfigError, match="unit 'bio-0000' has no held-out set of its own"):
        resolve(spec(data_dir, eval={"heldout_by": "unit"}))
    _add_unit_heldout(data_dir, {"math-0001": None})
    with pytest.raises(ConfigError, match="unit 'math-0001' has no held-out set"):
        resolve(spec(data_dir, unit_partitions=True, mixtures={"k_subsets": 1}))


def test_weighted_and_dirichlet_mixtures_with_weighted_validation(data_dir):
    s = spec(
        data_dir,
        mixtures={
            "k_subsets": 2,
            "weighted": [{"bio": 0.5, "cs": 0.3, "math": 0.2}, {"cs": 1, "math": 1}],
            "dirichlet": {"n": 3, "alpha": 1.0, "seed": 4},
        },
        validation={
            "weighted": [{"bio": 5, "cs": 3, "math": 2}],
            "mixtures": [["bio", "cs"]],
            "train": {"config": "tiny_seq"},
        },
    )
    study = resolve(s)
    weighted = [m for m in study.mixtures if m.weighted]
    # {cs: 1, math: 1} is the equal-share cs+math, already a 2-subset: scored once
    assert len(study.mixtures) == 6 + 1 + 3 and len(weighted) == 4
    first = weighted[0]
    assert first.proportions == {"bio": 0.5, "cs": 0.3, "math": 0.2}
    assert all(set(m.names) == set(study.partitions) for m in weighted[1:])
    assert [m.id for m in study.validation] == [
        Mixture.of({"bio": study.partitions["bio"], "cs": ["cs-0000"]}).id,
        first.id,
    ] or [m.id for m in study.validation] == [
        Mixture.of({"bio": study.partitions["bio"], "cs": ["cs-0000"]}).id
    ] + [first.id]
    # the seq budget of a proportion mixture is that of its partitions' equal-share mixture
    assert study.seq_tokens(first) == 6 * study.unit_tokens
    assert "bio:0.50+cs:0.30+math:0.20" in describe_plan(study)
    assert resolve(s).mixtures == study.mixtures  # deterministic
    # validation.train_tokens: one budget for every seq model, and the cost counts it
    fixed = resolve(
        spec(
            data_dir,
            **{**s.to_dict(), "validation": {**s.to_dict()["validation"], "train_tokens": 1234}},
        )
    )
    assert [fixed.seq_tokens(m) for m in fixed.validation] == [1234, 1234]
    assert fixed.cost.seq_validation_tokens == 2 * 1234


@pytest.mark.parametrize(
    ("over", "match"),
    [
        ({"mixtures": {"weighted": [{"bio": 1, "chem": 1}]}}, r"weighted\[0\]: unknown partition"),
        ({"mixtures": {"weighted": [{"bio": -1, "cs": 1}]}}, r"weighted\[0\]: .*>= 0"),
        ({"mixtures": {"weighted": [{}]}}, r"weighted\[0\]: expected a non-empty mapping"),
        ({"mixtures": {"dirichlet": {"n": 2, "alpha": -1}}}, r"mixtures\.dirichlet: .*alpha"),
        (
            {
                "mixtures": {"k_subsets": 2},
                "validation": {"weighted": [{"bio": 2, "cs": 1}], "train": {"config": "tiny_seq"}},
            },
            r"validation\.weighted\[0\]: .* not among the study's mixtures",
        ),
    ],
)
def test_proportion_mixture_errors_name_the_field(data_dir, over, match):
    with pytest.raises(ConfigError, match=match):
        resolve(spec(data_dir, **over))


def test_cli_parses_blends_and_domain_weights():
    """`--mixture a=3,b=1` is a proportion mixture, `a,b` the equal-share one; malformed
    name=value items are errors naming the flag and the item."""
    import argparse

    from megablocks_ablate.commands.study import _objective, parse_mixture_arg

    parts = {"a": ["a-0"], "b": ["b-0"]}
    blend = parse_mixture_arg("--mixture", "a=3, b=1", parts)
    assert blend.proportions == {"a": 0.75, "b": 0.25}
    assert parse_mixture_arg("--mixture", "b,a", parts) == Mixture.of(parts)
    for text, match in [
        ("a=3,b", r"--mixture: 'b' is not partition=share"),
        ("a=x,b=1", r"--mixture: 'a=x' is not partition=share"),
        ("a=1,c=1", r"--mixture: unknown partition 'c'"),
        ("a=-1,b=1", r"--mixture: .*>= 0"),
        ("", r"--mixture: give at least one partition"),
    ]:
        with pytest.raises(ConfigError, match=match):
            parse_mixture_arg("--mixture", text, parts)
    obj = _objective(argparse.Namespace(domain_weights="d=2,e=1", domains=None))
    assert obj.kind == "weighted" and dict(obj.domain_weights) == {"d": 2.0, "e": 1.0}
    assert obj({"d": math.e, "e": math.e**4}) == pytest.approx((2 * 1 + 1 * 4) / 3)
    with pytest.raises(ConfigError, match="not both"):
        _objective(argparse.Namespace(domain_weights="d=1", domains="d"))
    with pytest.raises(ConfigError, match=r"--domain-weights: 'd' is not domain=weight"):
        _objective(argparse.Namespace(domain_weights="d", domains=None))


def _drop_heldout(data_dir: str, reasons: dict[str, str | None]) -> None:
    """Take the held-out set from the fixture's partitions (partition -> the reason
    preprocess recorded; None: an older manifest without one)."""
    path = os.path.join(data_dir, "manifest.json")
    with open(path) as f:
        manifest = json.load(f)
    for p, why in reasons.items():
        manifest["partitions"][p]["heldout"] = None
        if why is not None:
            manifest["partitions"][p]["heldout_missing"] = why
    with open(path, "w") as f:
        json.dump(manifest, f)


def test_plan_and_meta_name_partitions_without_a_heldout_set(data_dir, tmp_path):
    why = "1 document: too few to hold out 1 (--heldout-min-docs) and keep one to train on"
    _drop_heldout(data_dir, {"phys": why, "cs": None})
    study = resolve(spec(data_dir))
    assert list(study.eval_sets) == ["bio", "math"]
    expected = {"cs": "preprocess held out none of its documents", "phys": why}
    assert study.without_heldout() == expected
    assert study.to_meta()["partitions_without_heldout"] == expected
    text = describe_plan(study)
    assert (
        "partitions without a held-out set (no in-domain row, not an evaluation domain): "
        "2 of 4" in text
    )
    assert f"    phys: {why}" in text and "    cs: preprocess held out none" in text
    # a group is named only when none of its units is evaluated in-domain
    grouped = {"life": ["bio"], "rest": ["cs-0000", "phys"], "num": ["math"]}
    study = resolve(spec(data_dir, partitions=grouped))
    assert study.without_heldout() == {
        "rest": f"cs: preprocess held out none of its documents; phys: {why}"
    }
    # an extra domain in-domain for the partition gives it an in-domain row after all
    extra = tmp_path / "phys.jsonl"
    extra.write_text('{"text": "physics"}\n')
    study = resolve(spec(data_dir, eval={"extra": [str(extra)], "heldout": ["bio"]}))
    assert study.without_heldout() == {
        "cs": "preprocess held out none of its documents",
        "math": "not listed in eval.heldout",
    }
    # every partition evaluated: no line, an empty meta entry
    cs = tmp_path / "cs.jsonl"
    cs.write_text('{"text": "computing"}\n')
    study = resolve(spec(data_dir, eval={"extra": [str(extra), str(cs)]}))
    assert study.without_heldout() == {} and study.to_meta()["partitions_without_heldout"] == {}
    assert "without a held-out set" not in describe_plan(study)
    with pytest.raises(
        ConfigError, match=r"eval.heldout: partition 'phys' has no held-out set \(1 document"
    ):
        resolve(spec(data_dir, eval={"heldout": ["phys"]}))
