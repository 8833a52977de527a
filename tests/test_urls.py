"""Track URL validation, room names and display-name sanitising."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from musicsync.urls import (
    AUDIO_EXTENSIONS,
    DEFAULT_DISPLAY_NAME,
    MAX_DISPLAY_NAME,
    MAX_URL_LENGTH,
    BadURL,
    is_valid_room_name,
    sanitize_display_name,
    validate_track_url,
)


def test_the_extension_list_matches_the_protocol_doc() -> None:
    assert set(AUDIO_EXTENSIONS) == {
        ".mp3",
        ".ogg",
        ".oga",
        ".opus",
        ".wav",
        ".m4a",
        ".flac",
        ".webm",
    }


@pytest.mark.parametrize("ext", AUDIO_EXTENSIONS)
@pytest.mark.parametrize(
    "template",
    [
        "http://example.com/music/track{}",
        "https://example.com/track{}",
        "https://cdn.example.com:8443/a/b/c/track{}?token=abc&x=1#t=10",
        "http://127.0.0.1/track{}",
        "https://[::1]/track{}",
        "/media/track{}",
        "/media/sub/dir/track{}",
        "/media/My%20Song{}",
        "/media/track{}?v=2",
    ],
)
def test_accepted_urls_for_every_extension(template: str, ext: str) -> None:
    for variant in (ext, ext.upper()):
        url = template.format(variant)
        assert validate_track_url(url) == url


@pytest.mark.parametrize(
    "url",
    ["HTTP://EXAMPLE.COM/A.MP3", "HtTpS://example.com/a.Mp3", "https://example.com/a.b.c.flac"],
)
def test_scheme_and_extension_are_case_insensitive(url: str) -> None:
    assert validate_track_url(url) == url


def test_url_of_exactly_the_maximum_length_is_accepted() -> None:
    url = "/media/" + "a" * (MAX_URL_LENGTH - len("/media/") - len(".mp3")) + ".mp3"
    assert len(url) == MAX_URL_LENGTH == 2048
    assert validate_track_url(url) == url


@pytest.mark.parametrize(
    "url",
    [
        "/media/" + "a" * (MAX_URL_LENGTH - len("/media/") - len(".mp3") + 1) + ".mp3",
        "https://example.com/" + "a" * 3000 + ".mp3",
    ],
)
def test_over_long_urls_are_refused(url: str) -> None:
    assert len(url) > MAX_URL_LENGTH
    with pytest.raises(BadURL, match="longer"):
        validate_track_url(url)


@pytest.mark.parametrize(
    "url",
    [
        "",
        # other schemes
        "javascript:alert(1)",
        "javascript:alert(1)//x.mp3",
        "JavaScript:alert(1)//.mp3",
        "data:audio/mpeg;base64,AAAA.mp3",
        "file:///etc/passwd",
        "file:///home/me/music/x.mp3",
        "ftp://example.com/x.mp3",
        "ws://example.com/x.mp3",
        "blob:https://example.com/x.mp3",
        "about:blank#.mp3",
        "mailto:a@b.c?x.mp3",
        # credentials
        "http://user:pass@example.com/x.mp3",
        "https://user@example.com/x.mp3",
        "https://@example.com/x.mp3",
        "https://example.com@evil.com/x.mp3",
        # no host
        "http:///x.mp3",
        "https:x.mp3",
        "http://:80/x.mp3",
        "http://[bad/x.mp3",
        # relative that is not /media/
        "x.mp3",
        "media/x.mp3",
        "./media/x.mp3",
        "/static/x.mp3",
        "/MEDIA/x.mp3",
        "/media",
        "/mediax/x.mp3",
        "/x.mp3",
        # protocol-relative
        "//evil.com/x.mp3",
        "//evil.com/media/x.mp3",
        # wrong extension
        "http://example.com/x.exe",
        "http://example.com/x.mp3.exe",
        "http://example.com/x.mp3/",
        "http://example.com/",
        "http://example.com",
        "https://example.com/x.html?f=.mp3",
        "https://example.com/x.html#.mp3",
        "/media/x.txt",
        "/media/x.txt?.mp3",
        "/media/x.mp4",
        "/media/xmp3",
    ],
)
def test_refused_urls(url: str) -> None:
    with pytest.raises(BadURL) as info:
        validate_track_url(url)
    assert str(info.value)


@pytest.mark.parametrize(
    "url",
    [
        "/media/../secret.mp3",
        "/media/a/../../secret.mp3",
        "/media/..",
        "/media/./x.mp3",
        "/media/%2e%2e/secret.mp3",
        "/media/%2E%2E/secret.mp3",
        "/media/%2e%2E%2fsecret.mp3",
        "/media/a/..%2F..%2Fsecret.mp3",
        "/media/.%2e/secret.mp3",
        "/media/..\\secret.mp3",
        "/media/%5c..%5csecret.mp3",
        "/media/x%00.mp3",
        "/media/x.mp3%00.mp3",
    ],
)
def test_media_path_traversal_is_refused(url: str) -> None:
    with pytest.raises(BadURL):
        validate_track_url(url)


@pytest.mark.parametrize(
    "url",
    [
        " /media/x.mp3",
        "/media/x.mp3 ",
        "/media/my song.mp3",
        "/media/x\t.mp3",
        "/media/x\n.mp3",
        "http://example.com/x\r\n.mp3",
        "https://example.com/a\x00.mp3",
        "https://example.com/a\x07.mp3",
        "https://example.com/a\x1b.mp3",
        "https://example.com/a\x7f.mp3",
        "https://example.com/a\x85.mp3",
        "https://example.com/a\u00a0.mp3",
        "https://example.com/a\u2028.mp3",
        "https://example.com/a\u3000.mp3",
        "java\nscript:alert(1)//x.mp3",
        "\x00javascript:alert(1)//x.mp3",
    ],
)
def test_whitespace_and_control_characters_are_refused(url: str) -> None:
    with pytest.raises(BadURL, match="whitespace or control"):
        validate_track_url(url)


def test_refusal_messages_say_why() -> None:
    with pytest.raises(BadURL, match="http"):
        validate_track_url("ftp://example.com/x.mp3")
    with pytest.raises(BadURL, match="credentials"):
        validate_track_url("https://u:p@example.com/x.mp3")
    with pytest.raises(BadURL, match="host"):
        validate_track_url("http:///x.mp3")
    with pytest.raises(BadURL, match="protocol-relative"):
        validate_track_url("//evil.com/x.mp3")
    with pytest.raises(BadURL, match="/media/"):
        validate_track_url("/static/x.mp3")
    with pytest.raises(BadURL, match="traversal"):
        validate_track_url("/media/%2e%2e/x.mp3")
    with pytest.raises(BadURL, match=r"\.mp3"):
        validate_track_url("/media/x.exe")


def test_bad_url_is_a_value_error() -> None:
    assert issubclass(BadURL, ValueError)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=120))
def test_validate_only_ever_raises_bad_url(url: str) -> None:
    try:
        result = validate_track_url(url)
    except BadURL:
        return
    assert result == url
    assert url.lower().startswith(("http://", "https://", "/media/"))
    assert not any(ch.isspace() for ch in url)


# -- room names -------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["a", "main", "Room_1", "my-room", "0", "A" * 64, "a-b_c-D_9", "--", "__"]
)
def test_valid_room_names(name: str) -> None:
    assert is_valid_room_name(name) is True


@pytest.mark.parametrize(
    "name",
    [
        "",
        "A" * 65,
        "a b",
        "a/b",
        "a.b",
        "..",
        "a\n",
        "\na",
        "room!",
        "caf\u00e9",
        "\u0661\u0662",  # Arabic-Indic digits
        "\uff52\uff4f\uff4f\uff4d",  # fullwidth letters
        "a\x00",
        "%2e",
    ],
)
def test_invalid_room_names(name: str) -> None:
    assert is_valid_room_name(name) is False


# -- display names ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (None, DEFAULT_DISPLAY_NAME),
        ("", DEFAULT_DISPLAY_NAME),
        ("   ", DEFAULT_DISPLAY_NAME),
        ("\x00\x01\x7f", DEFAULT_DISPLAY_NAME),
        ("\u200b\u202e", DEFAULT_DISPLAY_NAME),
        ("Alice", "Alice"),
        ("  Bob  ", "Bob"),
        ("Zoë", "Zoë"),
        ("Zoe\u0301", "Zoé"),  # NFC-normalised
        ("a\x00b", "ab"),
        ("a\x1b[31mred", "a[31mred"),
        ("bell\x07", "bell"),
        ("new\nline", "newline"),
        ("tab\tbed", "tabbed"),
        ("a   b", "a b"),
        ("a\u2028b", "a b"),
        ("rtl\u202eevil", "rtlevil"),
        ("zero\u200bwidth", "zerowidth"),
        ("x\ud800y", "xy"),
        ("🎵 DJ 🎵", "🎵 DJ 🎵"),
    ],
)
def test_sanitize_display_name(raw: str | None, expected: str) -> None:
    assert sanitize_display_name(raw) == expected


def test_display_name_is_capped_at_40_characters() -> None:
    assert MAX_DISPLAY_NAME == 40
    assert sanitize_display_name("x" * 41) == "x" * 40
    assert sanitize_display_name("y" * 40) == "y" * 40
    assert sanitize_display_name("z" * 1000) == "z" * 40


def test_display_name_cap_does_not_leave_trailing_space() -> None:
    assert sanitize_display_name("a" * 39 + " b") == "a" * 39


def test_display_name_cap_counts_after_stripping_control_characters() -> None:
    assert sanitize_display_name("\x00" * 100 + "n" * 50) == "n" * 40


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.none(), st.text(max_size=200)))
def test_sanitized_names_are_printable_single_line_and_bounded(raw: str | None) -> None:
    name = sanitize_display_name(raw)
    assert 1 <= len(name) <= MAX_DISPLAY_NAME
    assert name == name.strip()
    assert "\n" not in name and "\r" not in name
    assert "  " not in name
    assert all(ch == " " or not ch.isspace() for ch in name)
    assert all(ch.isprintable() for ch in name)
    assert sanitize_display_name(name) == name  # idempotent


# -- track titles (issue 10) ------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (None, None),
        ("", None),
        ("\u202e\u200b\x00\n", None),
        ("Song", "Song"),
        ("rtl\u202eevil.mp3", "rtlevil.mp3"),
        ("\u2067isolated\u2069", "isolated"),
        ("zero\u200bwidth\u200cjoin\u200d\ufeff", "zerowidthjoin"),
        ("a\x1b[2Jb", "a[2Jb"),
        ("two\u2028lines", "two lines"),
        ("  lots   of   space  ", "lots of space"),
        ("Zoe\u0301", "Zoé"),
        ("🎵 Title 🎵", "🎵 Title 🎵"),
    ],
)
def test_clean_title(raw: str | None, expected: str | None) -> None:
    from musicsync.urls import clean_title

    assert clean_title(raw) == expected


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=400))
def test_clean_titles_are_printable_single_line_and_bounded(raw: str) -> None:
    from musicsync.urls import MAX_TITLE_CHARS, clean_title

    title = clean_title(raw)
    if title is None:
        return
    assert 1 <= len(title) <= MAX_TITLE_CHARS == 200
    assert title == title.strip() and "  " not in title
    assert all(ch.isprintable() for ch in title)
    assert clean_title(title) == title
