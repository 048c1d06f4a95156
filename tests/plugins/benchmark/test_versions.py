"""Which Beam SDK versions the benchmark runs, and the job's requirements for each."""

from __future__ import annotations

import pytest

from caption_platform.benchmark import versions


@pytest.mark.parametrize("good", ["2.76.0", "2.77.0rc1", "2.58.1", "3.0", "2.77.0.dev1"])
def test_plain_releases_are_accepted(good) -> None:
    assert versions.check_version(good) == good


def test_same_version_is_pep440_equality() -> None:
    assert versions.same_version("2.77", "2.77.0")
    assert versions.same_version("2.13.0+cpu", "2.13.0")
    assert not versions.same_version("2.77.0rc1", "2.77.0")
    assert not versions.same_version("2.76.0", "2.77.0")


# --- requirements ------------------------------------------------------------------------


def test_derivation_replaces_only_apache_beam(job) -> None:
    _, reqs = job
    lines = versions.read_requirements(reqs)
    assert lines == ["apache-beam[gcp]==2.77.0", "torch==2.13.0", "transformers==5.24.0",
                     "pillow>=12.1.1,<13"]
    derived = versions.derive_requirements(lines, "2.76.0")
    assert derived == ["apache-beam[gcp]==2.76.0", "torch==2.13.0", "transformers==5.24.0",
                       "pillow>=12.1.1,<13"]


def test_derivation_keeps_extras_and_normalises_the_name() -> None:
    assert versions.derive_requirements(["Apache_Beam[gcp,dataframe] >= 2.70", "six"],
                                        "2.71.0") == ["apache-beam[gcp,dataframe]==2.71.0",
                                                      "six"]
    assert versions.derive_requirements(["apache-beam==2.77.0"], "2.75.0") == [
        "apache-beam[gcp]==2.75.0"]
    assert versions.derive_requirements(["apache-beam-extra==1.0", "apache-beam==2.77.0"],
                                        "2.75.0")[0] == "apache-beam-extra==1.0"


def test_derivation_needs_an_apache_beam_line() -> None:
    with pytest.raises(ValueError, match="no apache-beam line"):
        versions.derive_requirements(["torch==2.13.0"], "2.76.0")


def test_project_requirements_give_the_pinned_version() -> None:
    pinned = versions.pinned_beam_version()
    assert versions.same_version(pinned, versions.installed_beam_version())
    derived = versions.derive_requirements(
        versions.read_requirements(versions.DEFAULT_REQUIREMENTS), "2.76.0")
    assert "apache-beam[gcp]==2.76.0" in derived
    assert any(line.startswith("torch==") for line in derived)
    assert any(line.startswith("transformers==") for line in derived)


def test_requirements_follow_includes_and_refuse_other_options(tmp_path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "job.txt").write_text("apache-beam==2.77.0\n")
    (tmp_path / "all.txt").write_text("-r sub/job.txt\nduckdb==1.0  # db\n")
    assert versions.read_requirements(tmp_path / "all.txt") == ["apache-beam==2.77.0",
                                                                 "duckdb==1.0"]
    (tmp_path / "bad.txt").write_text("--index-url http://example\napache-beam==2.77.0\n")
    with pytest.raises(ValueError, match="unsupported pip option"):
        versions.read_requirements(tmp_path / "bad.txt")


# --- default versions --------------------------------------------------------------------


def test_default_versions_offline_decrement_the_minor_version() -> None:
    assert versions.default_versions("2.77.0") == ["2.75.0", "2.76.0", "2.77.0"]
    assert versions.default_versions("2.77.1", 2) == ["2.76.0", "2.77.1"]
    assert versions.default_versions("3.1.0", 4) == ["3.0.0", "3.1.0"]
    assert versions.default_versions("2.77.0", 1) == ["2.77.0"]


def test_default_versions_from_a_release_list_take_real_releases() -> None:
    available = ["2.77.0", "2.76.0rc2", "2.59.0", "2.58.0", "2.58.1", "2.57.0", "2.60.0"]
    assert versions.default_versions("2.60.0", 3, available=available) == [
        "2.58.1", "2.59.0", "2.60.0"]
    # a minor release that never happened is skipped, not invented
    assert versions.default_versions("2.60.0", 3, available=["2.60.0", "2.59.0", "2.57.0"]) \
        == ["2.57.0", "2.59.0", "2.60.0"]


def test_registry_output_is_parsed_and_failure_is_none(monkeypatch) -> None:
    output = ("WARNING: experimental\napache-beam (2.77.0)\n"
              "Available versions: 2.77.0, 2.76.0, 2.58.1, 0.6.0, 0.1.dev0+g1;rm\n")
    monkeypatch.setattr(versions, "run_command", lambda argv, **k: (0, output))
    assert versions.registry_versions() == ["2.77.0", "2.76.0", "2.58.1", "0.6.0"]
    monkeypatch.setattr(versions, "run_command", lambda argv, **k: (1, "ERROR: network"))
    assert versions.registry_versions() is None


def test_default_versions_refuse_nonsense() -> None:
    with pytest.raises(ValueError):
        versions.default_versions("2.77.0", 0)
    with pytest.raises(ValueError):
        versions.default_versions("main")


@pytest.mark.parametrize("bad", [
    "２.７６.０",  # fullwidth digits: `\d` took them, and made a `beam-２.７６.０` folder
    "2.7٦.0",  # an Arabic-Indic six
    "2.76.0rc١", "２.76", "2.76.0.post٣", "2.76.0.dev𝟑",
    "9" * 300 + ".0.0",  # OSError: File name too long, once a folder
    "1." + "0" * 40,
])
def test_only_ascii_versions_of_a_sane_length_are_accepted(bad) -> None:
    """Hardening item 9: `\\d` matches any Unicode digit; a version is ASCII only."""
    with pytest.raises(ValueError, match="not a Beam SDK version"):
        versions.check_version(bad)
    with pytest.raises(ValueError):
        versions.same_version(bad, "2.76.0")


def test_a_long_version_is_named_shortly_in_the_error() -> None:
    with pytest.raises(ValueError) as err:
        versions.check_version("9" * 300)
    assert len(str(err.value)) < 300
