"""Download, check and extract archives against a local HTTP server; the acquire stage."""

import gzip
import hashlib
import http.server
import io
import json
import os
import shutil
import tarfile
import threading

import pytest

from medexgen_lib.acquisition import (MARKER, AcquisitionError, UnsafeArchiveError, acquire,
                                      build_studies_table, check_archive, download_archive,
                                      safe_extract)
from medexgen_lib.files import honour_umask


def _tgz(path, members):
    """Write a .tgz of {name: bytes} members."""
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture
def reports_tgz(tmp_path, iuxray_sample):
    folder = iuxray_sample / "reports" / "ecgen-radiology"
    members = {f"ecgen-radiology/{p.name}": p.read_bytes() for p in sorted(folder.glob("*.xml"))[:20]}
    return _tgz(tmp_path / "NLMCXR_reports.tgz", members)


@pytest.fixture
def images_tgz(tmp_path, iuxray_sample):
    members = {p.name: p.read_bytes() for p in sorted((iuxray_sample / "images").glob("*.png"))}
    return _tgz(tmp_path / "NLMCXR_png.tgz", members)


class _Server:
    """Serves files from a dict; ``truncate`` cuts bodies, ``fail_first`` answers 503 once."""

    def __init__(self):
        self.files, self.truncate, self.fail_first, self.lie_about_length = {}, {}, set(), set()
        self.requests = 0
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                server.requests += 1
                name = self.path.lstrip("/")
                if name in server.fail_first:
                    server.fail_first.discard(name)
                    self.send_error(503)
                    return
                if name not in server.files:
                    self.send_error(404)
                    return
                body = server.files[name]
                sent = body[: server.truncate[name]] if name in server.truncate else body
                self.send_response(200)
                length = len(body) if name in server.lie_about_length else len(sent)
                self.send_header("Content-Length", str(length))
                self.end_headers()
                self.wfile.write(sent)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.fixture
def server():
    s = _Server()
    yield s
    s.httpd.shutdown()


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_download_complete_with_checksum_and_size(server, reports_tgz, tmp_path):
    server.files["r.tgz"] = reports_tgz.read_bytes()
    out = download_archive(f"{server.url}/r.tgz", tmp_path / "temp", sha256=_sha(reports_tgz),
                           size=reports_tgz.stat().st_size, retries=0, progressbar=False)
    assert out.read_bytes() == reports_tgz.read_bytes()


@pytest.mark.reliability
def test_a_downloaded_archive_gets_the_mode_the_umask_gives(server, reports_tgz, tmp_path):
    server.files["r.tgz"] = reports_tgz.read_bytes()
    previous = os.umask(0o022)
    try:  # pooch streams into a NamedTemporaryFile (0600) and renames it
        out = download_archive(f"{server.url}/r.tgz", tmp_path / "temp", retries=0, progressbar=False)
    finally:
        os.umask(previous)
    assert out.stat().st_mode & 0o777 == 0o644


@pytest.mark.reliability
@pytest.mark.parametrize("reused", ["shared archive linked into temp", "archive already in temp"])
def test_a_reused_archive_keeps_its_mode(reused, reports_tgz, tmp_path):
    """The umask is for the file the downloader just wrote: an archive found in temp/ (or a link
    there to a shared read-only copy) keeps its mode, and a link is never followed to chmod."""
    shared = tmp_path / "shared" / "r.tgz"
    shared.parent.mkdir()
    shutil.copy(reports_tgz, shared)
    (tmp_path / "temp").mkdir()
    if reused == "archive already in temp":
        shared = shutil.move(shared, tmp_path / "temp" / "r.tgz")
    else:
        (tmp_path / "temp" / "r.tgz").symlink_to(shared)
    os.chmod(shared, 0o440)
    previous = os.umask(0o022)
    try:  # nothing listens there: the archive must be reused, not downloaded
        out = download_archive("http://127.0.0.1:9/r.tgz", tmp_path / "temp", sha256=_sha(reports_tgz),
                               retries=0, progressbar=False)
    finally:
        os.umask(previous)
    assert out == tmp_path / "temp" / "r.tgz" and os.stat(shared).st_mode & 0o777 == 0o440
    honour_umask(out)  # and never through a link
    assert os.stat(shared).st_mode & 0o777 == 0o440 or not out.is_symlink()


def test_download_retries_after_a_server_error(server, reports_tgz, tmp_path):
    server.files["r.tgz"] = reports_tgz.read_bytes()
    server.fail_first.add("r.tgz")
    out = download_archive(f"{server.url}/r.tgz", tmp_path / "temp", retries=1, progressbar=False)
    assert out.exists() and server.requests == 2


@pytest.mark.reliability
@pytest.mark.parametrize("case", ["wrong_checksum", "truncated_with_checksum",
                                  "truncated_with_size", "connection_cut"])
def test_bad_download_is_reported_and_never_lands(case, server, reports_tgz, tmp_path):
    body = reports_tgz.read_bytes()
    server.files["r.tgz"] = body
    sha, size = "", 0
    if case == "wrong_checksum":
        sha = "0" * 64
    elif case == "truncated_with_checksum":
        server.truncate["r.tgz"], sha = len(body) // 2, _sha(reports_tgz)
    elif case == "truncated_with_size":
        server.truncate["r.tgz"], size = len(body) // 2, len(body)
    else:  # the server promises the full length and stops half way
        server.truncate["r.tgz"] = len(body) // 2
        server.lie_about_length.add("r.tgz")
    with pytest.raises(AcquisitionError, match=r"r\.tgz"):
        download_archive(f"{server.url}/r.tgz", tmp_path / "temp", sha256=sha, size=size,
                         retries=0, progressbar=False)
    assert list((tmp_path / "temp").iterdir()) == []  # no partial file left anywhere


@pytest.mark.reliability
def test_truncated_archive_without_checks_is_detected_deleted_and_not_extracted(
        server, reports_tgz, tmp_config):
    body = reports_tgz.read_bytes()
    server.files["NLMCXR_reports.tgz"] = body[: len(body) * 2 // 3]
    server.files["NLMCXR_png.tgz"] = body
    cfg = tmp_config("full", data__images_url=f"{server.url}/NLMCXR_png.tgz",
                     data__reports_url=f"{server.url}/NLMCXR_reports.tgz",
                     data__download_retries=0)
    with pytest.raises(AcquisitionError, match="truncated or corrupt"):
        acquire(cfg)
    assert not (cfg.paths.temp / "NLMCXR_reports.tgz").exists()
    assert [p.name for p in cfg.paths.reports.iterdir()] == []


def test_openi_download_extract_then_second_run_does_nothing(
        server, reports_tgz, images_tgz, tmp_config, iuxray_sample):
    server.files["NLMCXR_png.tgz"] = images_tgz.read_bytes()
    server.files["NLMCXR_reports.tgz"] = reports_tgz.read_bytes()
    cfg = tmp_config("full", data__images_url=f"{server.url}/NLMCXR_png.tgz",
                     data__reports_url=f"{server.url}/NLMCXR_reports.tgz",
                     data__images_sha256=_sha(images_tgz),
                     data__projections_csv=str(iuxray_sample / "indiana_projections.csv"))
    first = acquire(cfg)
    assert not first.did_nothing
    assert len(list(cfg.paths.images.glob("*.png"))) == 3
    assert len(list((cfg.paths.reports / "ecgen-radiology").glob("*.xml"))) == 20
    table = build_studies_table(cfg, first)
    assert len(table) == 20 and cfg.paths.studies_table.exists()
    requests_before = server.requests
    second = acquire(cfg)
    assert second.did_nothing and server.requests == requests_before
    assert all("nothing to do" in a for a in second.actions)


def test_local_archives_work_offline(reports_tgz, images_tgz, tmp_config):
    cfg = tmp_config("full", data__images_url="http://127.0.0.1:9/unreachable.tgz",
                     data__reports_url="http://127.0.0.1:9/unreachable.tgz",
                     data__images_archive=str(images_tgz), data__reports_archive=str(reports_tgz))
    acquire(cfg)
    assert len(list(cfg.paths.images.glob("*.png"))) == 3
    assert reports_tgz.exists()  # a user's own archive is never deleted


def test_extracted_folder_source(tmp_config, iuxray_sample):
    import shutil
    cfg = tmp_config("full", data__source="folder")
    with pytest.raises(AcquisitionError, match="holds no image files"):
        acquire(cfg)
    shutil.copytree(iuxray_sample / "images", cfg.paths.images, dirs_exist_ok=True)
    shutil.copytree(iuxray_sample / "reports", cfg.paths.reports, dirs_exist_ok=True)
    result = acquire(cfg)
    assert result.did_nothing
    table = build_studies_table(cfg, result)
    assert len(table) == 397
    # Without data.projections_csv a real run uses the bundled whole-collection table.
    assert set(table.projection_source[table.n_images > 0]) == {"bundled IU X-Ray table"}
    assert not any("unknown" in ps for ps in table.projections)


def _hostile_tgz(path, kind):
    with tarfile.open(path, "w:gz") as tar:
        ok = tarfile.TarInfo("fine.txt")
        ok.size = 2
        tar.addfile(ok, io.BytesIO(b"ok"))
        info = tarfile.TarInfo({"dotdot": "../escaped.txt", "absolute": "/tmp/medexgen_abs.txt",
                                "nested_dotdot": "a/../../escaped.txt"}.get(kind, "evil"))
        if kind == "symlink":
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        elif kind == "hardlink":
            info.type, info.linkname = tarfile.LNKTYPE, "fine.txt"
        elif kind == "device":
            info.type = tarfile.CHRTYPE
        elif kind == "fifo":
            info.type = tarfile.FIFOTYPE
        else:
            info.size = 4
        tar.addfile(info, io.BytesIO(b"evil") if info.isfile() else None)
    return path


@pytest.mark.reliability
@pytest.mark.parametrize("kind", ["dotdot", "nested_dotdot", "absolute", "symlink", "hardlink",
                                  "device", "fifo"])
def test_unsafe_members_are_refused_naming_the_member(kind, tmp_path):
    archive = _hostile_tgz(tmp_path / "evil.tgz", kind)
    target = tmp_path / "sandbox" / "target"
    with pytest.raises(UnsafeArchiveError, match=r"member '.*' refused"):
        safe_extract(archive, target, tmp_path / "sandbox" / "temp")
    assert not (tmp_path / "sandbox" / "escaped.txt").exists()
    assert not (tmp_path / "escaped.txt").exists()
    assert not target.exists() or list(target.iterdir()) == []


@pytest.mark.reliability
def test_check_archive_rejects_garbage_and_empty(tmp_path):
    (tmp_path / "junk.tgz").write_bytes(b"this is not a tarball" * 10)
    with pytest.raises(AcquisitionError, match="junk.tgz"):
        check_archive(tmp_path / "junk.tgz")
    with tarfile.open(tmp_path / "empty.tgz", "w:gz"):
        pass
    with pytest.raises(AcquisitionError, match="empty"):
        check_archive(tmp_path / "empty.tgz")


def test_phantom_acquisition_is_idempotent_and_regenerates_on_new_settings(tmp_config):
    cfg = tmp_config(data__n_phantom_studies=6, data__phantom_image_size=48)
    first = acquire(cfg)
    assert not first.did_nothing and len(list(cfg.paths.images.glob("*.png"))) >= 6
    assert acquire(cfg).did_nothing
    bigger = tmp_config(data__n_phantom_studies=9, data__phantom_image_size=48)
    assert not acquire(bigger).did_nothing
    assert len(build_studies_table(bigger, acquire(bigger))) == 9


@pytest.mark.reliability
def test_switching_source_in_the_same_folder_is_refused(tmp_config):
    acquire(tmp_config(data__n_phantom_studies=3, data__phantom_image_size=48))
    with pytest.raises(AcquisitionError, match="holds 'phantom' data"):
        acquire(tmp_config("full"))
    state = json.loads((tmp_config().paths.processed / "acquisition.json").read_text())
    assert state["source"] == "phantom"


@pytest.mark.reliability
def test_a_download_cut_half_way_then_run_again_completes(server, reports_tgz, images_tgz, tmp_config):
    body = reports_tgz.read_bytes()
    server.files["NLMCXR_reports.tgz"] = body
    server.files["NLMCXR_png.tgz"] = images_tgz.read_bytes()
    server.truncate["NLMCXR_reports.tgz"] = len(body) // 2  # the connection drops half way
    server.lie_about_length.add("NLMCXR_reports.tgz")
    cfg = tmp_config("full", data__images_url=f"{server.url}/NLMCXR_png.tgz",
                     data__reports_url=f"{server.url}/NLMCXR_reports.tgz", data__download_retries=0)
    with pytest.raises(AcquisitionError, match="NLMCXR_reports.tgz"):
        acquire(cfg)
    assert [p.name for p in cfg.paths.reports.iterdir()] == []
    assert not any(p.name.startswith("NLMCXR_reports") for p in cfg.paths.temp.rglob("*"))
    del server.truncate["NLMCXR_reports.tgz"]  # the network is back
    acquire(cfg)
    assert len(list(cfg.paths.reports.rglob("*.xml"))) == 20


# --------------------------------------------------------------------------- hostile archives (issue 16)

def _nothing_written(target, temp):
    assert not target.exists() or list(target.iterdir()) == []
    assert not temp.exists() or list(temp.iterdir()) == []


def _header_only_tgz(path, name, declared_size):
    """A .tgz whose one member declares ``declared_size`` bytes in its header; the data is not
    there, as the check must stop at the header (a real 3 GiB member would be read to the end)."""
    info = tarfile.TarInfo(name)
    info.size = declared_size
    with gzip.open(path, "wb") as gz:
        gz.write(info.tobuf())
        gz.write(bytes(4096))
    return path


@pytest.mark.reliability
@pytest.mark.parametrize("bomb", ["3GiB_member", "20000_members", "no_disk_space"])
def test_archive_bombs_are_refused_before_extracting(bomb, tmp_path, monkeypatch):
    target, temp = tmp_path / "target", tmp_path / "temp"
    if bomb == "3GiB_member":
        archive = _header_only_tgz(tmp_path / "bomb.tgz", "zeros.bin", 3 * 2**30)
        message = r"'zeros.bin' \(3221225472 bytes\).*data.archive_max_bytes"
    elif bomb == "20000_members":
        archive = _tgz(tmp_path / "many.tgz", {f"f{i}.txt": b"" for i in range(20_000)})
        message = "more than 15000 members.*data.archive_max_members"
    else:
        archive = _tgz(tmp_path / "big.tgz", {"images/zeros.png": bytes(100_000)})
        real_usage = shutil.disk_usage
        monkeypatch.setattr(shutil, "disk_usage", lambda p: real_usage(p)._replace(free=5_000))
        message = "declares 100000 bytes but only 5000 bytes are free"
    with pytest.raises(AcquisitionError, match=message):
        safe_extract(archive, target, temp)
    _nothing_written(target, temp)


@pytest.mark.reliability
def test_archive_limits_are_config_keys(images_tgz, reports_tgz, tmp_config):
    cfg = tmp_config("full", data__images_archive=str(images_tgz),
                     data__reports_archive=str(reports_tgz), data__archive_max_members=2)
    with pytest.raises(AcquisitionError, match="more than 2 members"):
        acquire(cfg)
    assert list(cfg.paths.images.glob("*.png")) == []


@pytest.mark.reliability
def test_an_archive_made_with_tar_c_dir_dot_is_accepted(tmp_path, iuxray_sample):
    folder = tmp_path / "folder"
    shutil.copytree(iuxray_sample / "images", folder / "images")
    archive = tmp_path / "x.tgz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=".")  # members ".", "./images", "./images/...", as tar -C dir . writes
    assert [m.name for m in tarfile.open(archive).getmembers()][:2] == [".", "./images"]
    assert safe_extract(archive, tmp_path / "target", tmp_path / "temp") == 3
    assert len(list((tmp_path / "target" / "images").glob("*.png"))) == 3
    nameless = tmp_path / "nameless.tgz"
    with tarfile.open(nameless, "w:gz") as tar:
        info = tarfile.TarInfo("")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"ok"))
    with pytest.raises(UnsafeArchiveError, match="empty name"):
        check_archive(nameless)


@pytest.mark.reliability
@pytest.mark.parametrize("names", [["a.png", "a.png"], ["images/a.png", "./images/a.png"]])
def test_duplicate_archive_members_are_refused_and_counted(names, tmp_path):
    archive = tmp_path / "dup.tgz"
    with tarfile.open(archive, "w:gz") as tar:
        for i, name in enumerate(names):
            info = tarfile.TarInfo(name)
            info.size = 1
            tar.addfile(info, io.BytesIO(bytes([i])))
    with pytest.raises(AcquisitionError, match=f"1 duplicate member name.*{names[1]!r}"):
        safe_extract(archive, tmp_path / "target", tmp_path / "temp")
    _nothing_written(tmp_path / "target", tmp_path / "temp")


@pytest.mark.reliability
def test_a_folder_already_in_the_target_survives_a_failed_swap(tmp_path, monkeypatch):
    target = tmp_path / "reports"
    (target / "ecgen-radiology").mkdir(parents=True)
    (target / "ecgen-radiology" / "1.xml").write_text("old")
    archive = _tgz(tmp_path / "r.tgz", {"ecgen-radiology/2.xml": b"new"})
    real_replace = os.replace

    def crash_moving_the_new_folder_in(src, dst):
        if "extract-" in str(src):
            raise OSError(28, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_moving_the_new_folder_in)
    with pytest.raises(AcquisitionError, match="is kept"):
        safe_extract(archive, target, tmp_path / "temp")
    assert sorted(p.name for p in target.iterdir()) == ["ecgen-radiology"]
    assert (target / "ecgen-radiology" / "1.xml").read_text() == "old"
    monkeypatch.setattr(os, "replace", real_replace)
    safe_extract(archive, target, tmp_path / "temp")
    assert sorted(p.name for p in target.iterdir()) == ["ecgen-radiology"]
    assert [p.name for p in (target / "ecgen-radiology").iterdir()] == ["2.xml"]


@pytest.mark.reliability
def test_a_stale_archive_in_temp_is_checked_and_downloaded_again(server, reports_tgz, tmp_path):
    server.files["NLMCXR_reports.tgz"] = reports_tgz.read_bytes()
    (tmp_path / "temp").mkdir()
    (tmp_path / "temp" / "NLMCXR_reports.tgz").write_bytes(b"old!")
    out = download_archive(f"{server.url}/NLMCXR_reports.tgz", tmp_path / "temp",
                           size=reports_tgz.stat().st_size, retries=0, progressbar=False)
    assert out.read_bytes() == reports_tgz.read_bytes() and server.requests == 1


@pytest.mark.reliability
@pytest.mark.parametrize("check", ["size", "sha256"])
def test_a_local_archive_is_checked_on_every_use(check, images_tgz, reports_tgz, tmp_config):
    wrong = {"data__reports_size": 4} if check == "size" else {"data__reports_sha256": "0" * 64}
    cfg = tmp_config("full", data__images_archive=str(images_tgz),
                     data__reports_archive=str(reports_tgz), **wrong)
    with pytest.raises(AcquisitionError, match=f"{reports_tgz}.*expected"):
        acquire(cfg)
    assert list(cfg.paths.reports.rglob("*.xml")) == []


@pytest.mark.reliability
@pytest.mark.parametrize("kind", [tarfile.GNUTYPE_LONGNAME, tarfile.XHDTYPE, tarfile.XGLTYPE])
def test_a_long_name_or_pax_header_bomb_is_refused_before_it_is_read(kind, tmp_path):
    """tarfile reads such a header into memory whole: one declaring 3 GiB (a 3 MB .tgz of
    zeros) took 3 GiB of memory, or raised a raw MemoryError, before any member was checked."""
    info = tarfile.TarInfo("././@LongLink")
    info.type, info.size = kind, 3 * 2**30
    archive = tmp_path / "header_bomb.tgz"
    with gzip.open(archive, "wb") as gz:
        gz.write(info.tobuf(format=tarfile.GNU_FORMAT))
        gz.write(bytes(4096))
    with pytest.raises(AcquisitionError, match=r"header_bomb.tgz: a long-name/pax header .* "
                                               r"declares 3221225472 bytes"):
        safe_extract(archive, tmp_path / "target", tmp_path / "temp")
    _nothing_written(tmp_path / "target", tmp_path / "temp")


@pytest.mark.reliability
def test_a_member_named_like_the_swap_backup_is_refused(tmp_path):
    """A top-level ``.x.old`` next to ``x`` was taken for the backup of ``x`` and silently lost."""
    archive = _tgz(tmp_path / "old.tgz", {"x/a.xml": b"a", ".x.old/b.xml": b"b"})
    with pytest.raises(UnsafeArchiveError, match=r"'.x.old/b.xml' refused .*reserved"):
        safe_extract(archive, tmp_path / "target", tmp_path / "temp")
    _nothing_written(tmp_path / "target", tmp_path / "temp")


@pytest.mark.reliability
def test_a_corrupt_archive_gets_a_one_line_error(tmp_path):
    """tarfile's "r:*" names every method it tried on its own line: the error was 5 lines."""
    (tmp_path / "bad.tgz").write_bytes(b"not an archive at all")
    with pytest.raises(AcquisitionError, match="bad.tgz is truncated or corrupt") as caught:
        check_archive(tmp_path / "bad.tgz")
    assert "\n" not in str(caught.value)


def _old_gnu_sparse_header(name, extension_blocks):
    """An old-GNU sparse member ('S') followed by ``extension_blocks`` blocks of sparse map."""
    def field(number, width):
        return b"%0*o\0" % (width - 1, number)

    header = bytearray(512)
    header[0:len(name)] = name.encode()
    for start, width, value in ((100, 8, 0o644), (108, 8, 0), (116, 8, 0), (124, 12, 0),
                                (136, 12, 0), (483, 12, 21 * extension_blocks)):
        header[start:start + width] = field(value, width)
    header[156:157], header[257:265], header[482] = b"S", b"ustar  \0", 1
    header[148:156] = b"%06o\0 " % (256 + sum(header[:148]) + sum(header[156:]))
    blocks = []
    for i in range(extension_blocks):
        block = bytearray(512)
        for j in range(21):
            block[j * 24:j * 24 + 24] = field(1000 * i + 10 * j, 12) + field(5, 12)
        block[504] = i < extension_blocks - 1
        blocks.append(bytes(block))
    return bytes(header) + b"".join(blocks)


def _pax_sparse_10(name):
    """A pax 1.0 sparse member: the map (entry count, offset, size, ...) heads its data."""
    records = b""
    for key, value in (("GNU.sparse.major", "1"), ("GNU.sparse.minor", "0"),
                       ("GNU.sparse.name", name), ("GNU.sparse.realsize", "10")):
        body = f" {key}={value}\n".encode()
        length = len(body) + len(str(len(body)))
        length += len(str(length)) - len(str(len(body)))
        records += str(length).encode() + body
    pax = tarfile.TarInfo("././@PaxHeader")
    pax.type, pax.size = tarfile.XHDTYPE, len(records)
    data = b"1\n0\n5\n".ljust(512, b"\0") + b"x" * 5
    member = tarfile.TarInfo("GNUSparseFile.0/" + name)
    member.size = len(data)
    return (pax.tobuf(format=tarfile.USTAR_FORMAT) + records.ljust(512, b"\0")
            + member.tobuf(format=tarfile.USTAR_FORMAT) + data.ljust(1024, b"\0"))


@pytest.mark.reliability
@pytest.mark.parametrize("kind", ["old_gnu", "pax_1.0"])
def test_a_sparse_member_is_refused_before_its_map_is_read(kind, tmp_path):
    """A sparse map is read into memory whole: 50,000 extension blocks (a 112 kB .tgz) took
    over 100 MB and 9 s before any check; Open-i's archives hold no sparse files."""
    member = _old_gnu_sparse_header("a.png", 3) if kind == "old_gnu" else _pax_sparse_10("a.png")
    archive = tmp_path / "sparse.tgz"
    with gzip.open(archive, "wb") as gz:
        gz.write(member + bytes(1024))
    with pytest.raises(AcquisitionError, match=r"sparse.tgz: member .* is a sparse file"):
        safe_extract(archive, tmp_path / "target", tmp_path / "temp")
    _nothing_written(tmp_path / "target", tmp_path / "temp")


# --------------------------------------------------------------------------- never delete what we did not write

def _snapshot(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.reliability
@pytest.mark.parametrize("layout", ["user files", "extracted copy"])
def test_the_phantom_refuses_a_data_folder_holding_files_it_did_not_write(layout, tmp_config, iuxray_sample):
    cfg = tmp_config(data__n_phantom_studies=10, data__phantom_image_size=48)
    if layout == "user files":  # the case
        for name, text in {"images/CXR1/x.png": b"scan", "images/IMPORTANT_NOTES.txt": b"notes",
                           "reports/1.xml": b"<report/>"}.items():
            (cfg.paths.images.parent / name).parent.mkdir(parents=True, exist_ok=True)
            (cfg.paths.images.parent / name).write_bytes(text)
        named = r"images holds IMPORTANT_NOTES\.txt"
    else:  # the README's extracted copy: PNGs in images/, XMLs in reports/ecgen-radiology/
        shutil.copytree(iuxray_sample / "images", cfg.paths.images)
        shutil.copytree(iuxray_sample / "reports", cfg.paths.reports)
        named = rf"images holds {sorted(p.name for p in cfg.paths.images.glob('*.png'))[0]}"
    before = _snapshot(cfg.paths.images.parent)
    with pytest.raises(AcquisitionError, match=named + r", which MedExGen did not write.*data\.source folder"):
        acquire(cfg)
    assert _snapshot(cfg.paths.images.parent) == before  # nothing deleted, nothing added


@pytest.mark.reliability
def test_the_phantom_replaces_its_own_files_only(tmp_config):
    first = tmp_config(data__n_phantom_studies=6, data__phantom_image_size=48)
    acquire(first)
    (first.paths.reports / "ecgen-radiology" / "my_report.xml").write_text("<mine/>")
    before = _snapshot(first.paths.images.parent)
    other = tmp_config(data__n_phantom_studies=9, data__phantom_image_size=48)
    with pytest.raises(AcquisitionError, match=r"reports holds ecgen-radiology/my_report\.xml"):
        acquire(other)
    assert _snapshot(first.paths.images.parent) == before
    (first.paths.reports / "ecgen-radiology" / "my_report.xml").unlink()
    acquire(other)  # its own earlier files: replaced
    assert len(build_studies_table(other, acquire(other))) == 9


@pytest.mark.reliability
def test_a_fresh_clone_an_older_phantom_and_an_interrupted_one_are_replaced(tmp_config, monkeypatch):
    from medexgen_lib import acquisition
    from medexgen_lib.phantom import phantom_files

    cfg = tmp_config(data__n_phantom_studies=6, data__phantom_image_size=48)
    for folder in (cfg.paths.images, cfg.paths.reports):  # a fresh clone: empty folders with .gitkeep
        folder.mkdir(parents=True)
        (folder / ".gitkeep").write_text("")
    acquire(cfg)
    data = cfg.paths.images.parent
    written = {p.relative_to(data).as_posix() for p in data.glob("[ir]*/**/*") if p.is_file() and not p.name.startswith(".")}
    assert written == set(phantom_files(6, 0)) and (cfg.paths.images / ".gitkeep").exists()
    for folder in (cfg.paths.images, cfg.paths.reports):  # as a MedExGen without manifests left it
        (folder / acquisition.MANIFEST).unlink()
    acquire(tmp_config(data__n_phantom_studies=5, data__phantom_image_size=48))
    assert len(list(cfg.paths.images.glob("CXR6_*.png"))) == 0  # the older set's sixth study: gone

    def interrupted(n_studies, seed, out_dir, image_size):  # killed half way through writing
        (cfg.paths.images / "CXR1_IM-0001-1001.png").write_bytes(b"half")
        raise KeyboardInterrupt
    monkeypatch.setattr(acquisition, "make_phantom_dataset", interrupted)
    with pytest.raises(KeyboardInterrupt):
        acquire(tmp_config(data__n_phantom_studies=7, data__phantom_image_size=48))
    monkeypatch.undo()
    seven = tmp_config(data__n_phantom_studies=7, data__phantom_image_size=48)
    assert not acquire(seven).did_nothing  # not taken for complete, and its files are its own
    assert len(build_studies_table(seven, acquire(seven))) == 7


@pytest.mark.reliability
def test_an_archive_is_not_extracted_over_files_it_did_not_write(reports_tgz, images_tgz, tmp_config):
    cfg = tmp_config("full", data__images_archive=str(images_tgz), data__reports_archive=str(reports_tgz))
    (cfg.paths.reports / "ecgen-radiology").mkdir(parents=True)
    (cfg.paths.reports / "ecgen-radiology" / "1.xml").write_text("<my edited report/>")
    with pytest.raises(AcquisitionError, match=r"reports holds ecgen-radiology/1\.xml, which MedExGen"):
        acquire(cfg)
    assert (cfg.paths.reports / "ecgen-radiology" / "1.xml").read_text() == "<my edited report/>"


def _extract_openi(tmp_config, images_tgz, reports_tgz, data_dir):
    cfg = tmp_config("full", paths__data_dir=str(data_dir), data__images_archive=str(images_tgz),
                     data__reports_archive=str(reports_tgz))
    acquire(cfg)
    return cfg


@pytest.mark.reliability
def test_the_phantom_never_replaces_files_an_archive_wrote(reports_tgz, images_tgz, tmp_config, tmp_path):
    extracted = _extract_openi(tmp_config, images_tgz, reports_tgz, tmp_path / "D")
    copy = tmp_path / "E"  # cp -a D/images D/reports E/: the manifests travel along
    for name in ("images", "reports"):
        shutil.copytree(getattr(extracted.paths, name), copy / name)
    (copy / "reports" / "ecgen-radiology" / "MY_NOTES.txt").write_text("mine")
    before = _snapshot(copy)
    phantom = tmp_config(paths__data_dir=str(copy), data__n_phantom_studies=6, data__phantom_image_size=48)
    with pytest.raises(AcquisitionError, match=r"images holds .*\.png, which MedExGen did not write"):
        acquire(phantom)
    assert _snapshot(copy) == before


@pytest.mark.reliability
def test_re_extracting_an_archive_refuses_a_user_file_inside_an_extracted_folder(
        reports_tgz, images_tgz, tmp_config, tmp_path):
    cfg = _extract_openi(tmp_config, images_tgz, reports_tgz, tmp_path / "D")
    (cfg.paths.reports / MARKER).unlink()  # as an interrupted run leaves it
    notes = cfg.paths.reports / "ecgen-radiology" / "MY_NOTES.txt"
    notes.write_text("mine")
    before = _snapshot(cfg.paths.reports)
    with pytest.raises(AcquisitionError, match=r"reports holds ecgen-radiology/MY_NOTES\.txt, which MedExGen"):
        acquire(cfg)
    assert _snapshot(cfg.paths.reports) == before
    notes.unlink()
    assert not acquire(cfg).did_nothing  # its own files alone: extracted again
