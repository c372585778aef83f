#!/usr/bin/env python3
"""Static checks of packaging/kubernetes/*.yaml and packaging/container/Containerfile.

Needs only PyYAML (tests/packaging/run.sh makes a venv with it). Prints one
PASS/FAIL line per check and a last line "N passed, N failed"; exits 1 when
a check failed.

    python3 tests/packaging/check-manifests.py [REPO_ROOT]
"""

from __future__ import annotations

import posixpath
import re
import sys
from pathlib import Path

import yaml

ROOT = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[2]
K8S = ROOT / "packaging" / "kubernetes"
CONTAINERFILE = ROOT / "packaging" / "container" / "Containerfile"
SECRET_NAME = "z4j-agentd"
AGENTD_IMAGE_NAME = "z4j-agentd"

passed = 0
failed = 0


def check(name: str, ok: bool, detail: str = "") -> bool:
    global passed, failed
    if ok:
        passed += 1
        print(f"PASS {name}")
    else:
        failed += 1
        print(f"FAIL {name}{': ' + detail if detail else ''}")
    return ok


# --------------------------------------------------------------- inputs


def load_all() -> dict[str, list[dict]]:
    docs: dict[str, list[dict]] = {}
    for path in sorted(K8S.glob("*.yaml")):
        try:
            loaded = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        except yaml.YAMLError as e:
            check(f"{path.name} parses", False, str(e))
            continue
        ok = bool(loaded) and all(
            isinstance(d, dict) and d.get("apiVersion") and d.get("kind") and d.get("metadata", {}).get("name")
            for d in loaded
        )
        check(f"{path.name} parses: {len(loaded)} document(s) with apiVersion, kind, metadata.name", ok)
        docs[path.name] = loaded
    return docs


def cargo_version() -> str:
    m = re.search(r'^version\s*=\s*"([^"]+)"', (ROOT / "Cargo.toml").read_text(), re.M)
    return m.group(1) if m else "?"


def daemon_env_names() -> set[str]:
    """The Z4J_* variables the daemon reads: every entry of the settings
    table (src/config/keys.rs: `NAME field: Kind "Z4J_..."`), plus the
    clap `env = "..."` attributes elsewhere in src/ (the `status` flags)."""
    names: set[str] = set()
    table = (ROOT / "src" / "config" / "keys.rs").read_text()
    names.update(re.findall(r'^\s*[A-Z][A-Z0-9_]*\s+\w+:\s*\w+\s+"(Z4J_[A-Z0-9_]+)"', table, re.M))
    for path in (ROOT / "src").rglob("*.rs"):
        names.update(re.findall(r'env\s*=\s*"(Z4J_[A-Z0-9_]+)"', path.read_text()))
    return names


def containerfile() -> dict:
    text = CONTAINERFILE.read_text()
    joined = re.sub(r"\\\n", " ", text)
    info: dict = {"env": {}, "from": [], "text": text}
    for line in joined.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        word = word.upper()
        if word == "FROM":
            info["from"].append(rest.split()[0])
        elif word == "ARG" and "=" in rest:
            k, _, v = rest.partition("=")
            info.setdefault("args", {})[k.strip()] = v.strip()
        elif word == "ENV":
            for k, v in re.findall(r"([A-Za-z_][A-Za-z0-9_]*)=(\S+)", rest):
                info["env"][k] = v
        elif word in ("USER", "ENTRYPOINT", "CMD", "HEALTHCHECK", "VOLUME"):
            info[word.lower()] = rest.strip()
    return info


# ------------------------------------------------------------- helpers


def pod_spec(doc: dict) -> dict:
    return doc.get("spec", {}).get("template", {}).get("spec", {})


def all_containers(spec: dict) -> list[tuple[str, dict]]:
    out = [("initContainers", c) for c in spec.get("initContainers", []) or []]
    out += [("containers", c) for c in spec.get("containers", []) or []]
    return out


def is_agentd(c: dict) -> bool:
    image = c.get("image", "")
    return image.rsplit("/", 1)[-1].split(":")[0] == AGENTD_IMAGE_NAME


def env_value(c: dict, name: str):
    for e in c.get("env", []) or []:
        if e.get("name") == name:
            return e
    return None


def env_str(c: dict, name: str):
    e = env_value(c, name)
    return None if e is None else e.get("value")


def mounts(c: dict) -> dict[str, str]:
    """mountPath -> volume name."""
    return {m["mountPath"]: m["name"] for m in c.get("volumeMounts", []) or []}


def volume(spec: dict, name: str) -> dict:
    for v in spec.get("volumes", []) or []:
        if v.get("name") == name:
            return v
    return {}


def volume_for_path(c: dict, path: str):
    """(mountPath, volume name) of the mount that holds `path`, deepest first."""
    best = None
    for mp, name in mounts(c).items():
        if path == mp or path.startswith(mp.rstrip("/") + "/"):
            if best is None or len(mp) > len(best[0]):
                best = (mp, name)
    return best


def effective(spec: dict, c: dict, key: str):
    sc = c.get("securityContext", {}) or {}
    if key in sc:
        return sc[key]
    return (spec.get("securityContext", {}) or {}).get(key)


def groups_of(spec: dict, c: dict) -> set[int]:
    g = set()
    if effective(spec, c, "runAsGroup") is not None:
        g.add(effective(spec, c, "runAsGroup"))
    psc = spec.get("securityContext", {}) or {}
    g.update(psc.get("supplementalGroups", []) or [])
    if psc.get("fsGroup") is not None:
        g.add(psc["fsGroup"])
    return g


# --------------------------------------------------------------- checks


def check_secret(docs) -> tuple[str, set[str]]:
    secrets = [d for d in docs.get("secret.example.yaml", []) if d.get("kind") == "Secret"]
    if not check("secret.example.yaml holds one Secret", len(secrets) == 1, f"found {len(secrets)}"):
        return SECRET_NAME, set()
    s = secrets[0]
    name = s["metadata"]["name"]
    keys = set((s.get("stringData") or {}).keys()) | set((s.get("data") or {}).keys())
    check(f"Secret is named {SECRET_NAME}", name == SECRET_NAME, name)
    want = {"token", "hmac-secret", "brain-url"}
    check("Secret has keys token, hmac-secret, brain-url", want <= keys, f"keys {sorted(keys)}")
    return name, keys


def check_secret_refs(fname, doc, secret_name, secret_keys):
    spec = pod_spec(doc)
    refs = []
    for _, c in all_containers(spec):
        for e in c.get("env", []) or []:
            ref = (e.get("valueFrom") or {}).get("secretKeyRef")
            if ref:
                refs.append((f"{c['name']} env {e['name']}", ref.get("name"), [ref.get("key")]))
        for ef in c.get("envFrom", []) or []:
            if "secretRef" in ef:
                refs.append((f"{c['name']} envFrom", ef["secretRef"].get("name"), []))
    for v in spec.get("volumes", []) or []:
        if "secret" in v:
            items = [i.get("key") for i in v["secret"].get("items", []) or []]
            refs.append((f"volume {v['name']}", v["secret"].get("secretName"), items))
    for where, name, keys in refs:
        bad = [k for k in keys if k not in secret_keys]
        check(
            f"{fname} {doc['kind']}: {where} uses Secret {secret_name} and its keys",
            name == secret_name and not bad,
            f"secret {name!r}, unknown keys {bad}",
        )
    return refs


def check_security(fname, doc):
    spec = pod_spec(doc)
    for kind, c in all_containers(spec):
        label = f"{fname} {doc['kind']}: {kind[:-1]} {c['name']}"
        sc = c.get("securityContext", {}) or {}
        caps = sc.get("capabilities", {}) or {}
        drop_all = "ALL" in (caps.get("drop") or [])
        no_esc = sc.get("allowPrivilegeEscalation") is False
        ro = sc.get("readOnlyRootFilesystem") is True
        uid = effective(spec, c, "runAsUser")
        nonroot = effective(spec, c, "runAsNonRoot") is True and uid not in (None, 0)
        one_shot_init = kind == "initContainers" and c.get("restartPolicy") != "Always"
        if one_shot_init and uid == 0:
            # The one exception: a one-shot init container that hands hostPath
            # directories to the daemon's uid, with CAP_CHOWN and nothing else.
            added = set(caps.get("add") or [])
            check(
                f"{label}: root only to chown, all other capabilities dropped, no escalation, read-only root",
                drop_all and no_esc and ro and added <= {"CHOWN"} and not sc.get("privileged"),
                f"securityContext {sc}",
            )
        else:
            check(
                f"{label}: non-root, no privilege escalation, all capabilities dropped, read-only root",
                nonroot and drop_all and no_esc and ro and not caps.get("add") and not sc.get("privileged"),
                f"runAsUser {uid}, securityContext {sc}",
            )
        res = c.get("resources", {}) or {}
        check(
            f"{label}: memory request and limit",
            bool((res.get("requests") or {}).get("memory")) and bool((res.get("limits") or {}).get("memory")),
            f"resources {res}",
        )


def check_agentd_container(fname, doc, c, image_info, known_env):
    spec = pod_spec(doc)
    label = f"{fname} {doc['kind']}: {c['name']}"
    unknown = sorted(
        e["name"] for e in c.get("env", []) or [] if e["name"].startswith("Z4J_") and e["name"] not in known_env
    )
    check(f"{label}: every Z4J_* variable is one the daemon reads", not unknown, f"unknown {unknown}")
    check(
        f"{label}: token and HMAC secret come from files, not env values",
        env_value(c, "Z4J_TOKEN") is None
        and env_value(c, "Z4J_HMAC_SECRET") is None
        and bool(env_str(c, "Z4J_TOKEN_FILE"))
        and bool(env_str(c, "Z4J_HMAC_SECRET_FILE")),
    )
    for var in ("Z4J_TOKEN_FILE", "Z4J_HMAC_SECRET_FILE"):
        path = env_str(c, var) or ""
        held = volume_for_path(c, path)
        vol = volume(spec, held[1]) if held else {}
        items = {i.get("path") for i in (vol.get("secret") or {}).get("items", []) or []}
        rel = posixpath.relpath(path, held[0]) if held else None
        check(
            f"{label}: {var} {path} is a file of the mounted Secret",
            bool(vol.get("secret")) and (not items or rel in items),
            f"mount {held}, items {sorted(i for i in items if i)}",
        )
    brain = (env_value(c, "Z4J_BRAIN_URL") or {}).get("valueFrom", {}).get("secretKeyRef")
    check(f"{label}: Z4J_BRAIN_URL from the Secret's brain-url", bool(brain) and brain.get("key") == "brain-url")

    sock = env_str(c, "Z4J_SOCKET_PATH")
    check(
        f"{label}: Z4J_SOCKET_PATH is the image's ({image_info['env'].get('Z4J_SOCKET_PATH')})",
        sock == image_info["env"].get("Z4J_SOCKET_PATH"),
        f"{sock}",
    )
    state = env_str(c, "STATE_DIRECTORY")
    held = volume_for_path(c, state or "")
    check(
        f"{label}: STATE_DIRECTORY {state} is a subdirectory of a mounted volume",
        bool(held) and state.rstrip("/") != held[0].rstrip("/"),
        f"mount {held}",
    )
    check(
        f"{label}: STATE_DIRECTORY is the image's",
        state == image_info["env"].get("STATE_DIRECTORY"),
        f"{state} vs {image_info['env'].get('STATE_DIRECTORY')}",
    )
    check(
        f"{label}: /tmp is writable (SQLite temp files) under a read-only root",
        volume_for_path(c, "/tmp/x") is not None,
    )
    entry = image_info.get("entrypoint", "")
    binary = (re.findall(r'"([^"]+)"', entry) or ["?"])[0]
    probes = [c.get(p) for p in ("startupProbe", "readinessProbe", "livenessProbe") if c.get(p)]
    check(
        f"{label}: readiness and liveness probes run `{binary} status`",
        c.get("readinessProbe") is not None
        and c.get("livenessProbe") is not None
        and all((p.get("exec") or {}).get("command") == [binary, "status"] for p in probes),
    )
    check(f"{label}: runs `run`", c.get("args") == ["run"] or c.get("command") == [binary, "run"])
    return sock


def check_socket_shared(fname, doc, agentd, apps, sock):
    spec = pod_spec(doc)
    held = volume_for_path(agentd, sock or "")
    if not check(f"{fname}: the daemon's socket {sock} is on a volume", held is not None):
        return
    mount_path, vol_name = held
    mode = int(env_str(agentd, "Z4J_SOCKET_MODE") or "0660", 8)
    # The socket's group: fsGroup on an emptyDir (setgid directory), else the
    # daemon's own group.
    fs_group = (spec.get("securityContext", {}) or {}).get("fsGroup")
    if "emptyDir" in volume(spec, vol_name) and fs_group is not None:
        socket_gid = fs_group
    else:
        socket_gid = effective(spec, agentd, "runAsGroup")
    check(f"{fname}: at least one application container", bool(apps))
    for app in apps:
        label = f"{fname}: app {app['name']}"
        check(
            f"{label} mounts volume {vol_name} at {mount_path} like the daemon",
            mounts(app).get(mount_path) == vol_name,
            f"mounts {mounts(app)}",
        )
        app_sock = env_str(app, "Z4J_SOCKET_PATH")
        check(
            f"{label}: Z4J_SOCKET_PATH {app_sock} is the daemon's socket, under {mount_path}",
            app_sock == sock and app_sock.startswith(mount_path.rstrip("/") + "/"),
        )
        check(
            f"{label} may connect (socket mode {mode:04o}, group {socket_gid})",
            bool(mode & 0o006) or (socket_gid in groups_of(spec, app) and bool(mode & 0o060)),
            f"app groups {sorted(groups_of(spec, app))}",
        )


def check_sidecar(docs, image_info, known_env):
    deps = [d for d in docs.get("sidecar.yaml", []) if d.get("kind") == "Deployment"]
    if not check("sidecar.yaml holds a Deployment", len(deps) == 1):
        return
    doc = deps[0]
    spec = pod_spec(doc)
    agentds = [c for _, c in all_containers(spec) if is_agentd(c)]
    apps = [c for _, c in all_containers(spec) if not is_agentd(c)]
    if not check("sidecar.yaml: one z4j-agentd container", len(agentds) == 1):
        return
    agentd = agentds[0]
    native = agentd in (spec.get("initContainers") or [])
    check(
        "sidecar.yaml: z4j-agentd is a native sidecar (init container, restartPolicy Always) with a startupProbe",
        not native or (agentd.get("restartPolicy") == "Always" and agentd.get("startupProbe") is not None),
    )
    sock = check_agentd_container("sidecar.yaml", doc, agentd, image_info, known_env)
    check_socket_shared("sidecar.yaml", doc, agentd, apps, sock)
    held = volume_for_path(agentd, sock or "")
    if held:
        check("sidecar.yaml: the socket volume is a pod-private emptyDir", "emptyDir" in volume(spec, held[1]))


def check_daemonset(docs, image_info, known_env):
    dss = [d for d in docs.get("daemonset.yaml", []) if d.get("kind") == "DaemonSet"]
    if not check("daemonset.yaml holds a DaemonSet", len(dss) == 1):
        return None
    doc = dss[0]
    spec = pod_spec(doc)
    agentds = [c for c in spec.get("containers", []) or [] if is_agentd(c)]
    if not check("daemonset.yaml: one z4j-agentd container", len(agentds) == 1):
        return None
    agentd = agentds[0]
    sock = check_agentd_container("daemonset.yaml", doc, agentd, image_info, known_env)
    held = volume_for_path(agentd, sock or "")
    sock_host = (volume(spec, held[1]).get("hostPath") or {}) if held else {}
    check(
        "daemonset.yaml: the socket directory is a hostPath (/run/z4j-agentd)",
        sock_host.get("path") == "/run/z4j-agentd" and sock_host.get("type") in ("DirectoryOrCreate", "Directory"),
        f"{sock_host}",
    )
    state = volume_for_path(agentd, env_str(agentd, "STATE_DIRECTORY") or "")
    spool_host = (volume(spec, state[1]).get("hostPath") or {}) if state else {}
    check(
        "daemonset.yaml: the spool is on a hostPath (/var/lib/z4j-agentd)",
        spool_host.get("path") == "/var/lib/z4j-agentd",
        f"{spool_host}",
    )
    node = (env_value(agentd, "NODE_NAME") or {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
    check("daemonset.yaml: NODE_NAME from spec.nodeName", node == "spec.nodeName", f"{node}")
    check(
        "daemonset.yaml: Z4J_AGENT_NAME and Z4J_WORKER_ID derive from the node name",
        "$(NODE_NAME)" in (env_str(agentd, "Z4J_AGENT_NAME") or "")
        and "$(NODE_NAME)" in (env_str(agentd, "Z4J_WORKER_ID") or ""),
    )
    ru = doc["spec"].get("updateStrategy", {}).get("rollingUpdate", {})
    check(
        "daemonset.yaml: rolling updates never run two daemons on one node",
        ru.get("maxSurge", 0) in (0, "0", "0%"),
        f"{ru}",
    )
    # The init container must prepare exactly the hostPath directories.
    init = spec.get("initContainers") or []
    uid = effective(spec, agentd, "runAsUser")
    prepared = " ".join(" ".join(c.get("command", []) + c.get("args", [])) for c in init)
    check(
        f"daemonset.yaml: an init container hands the hostPath directories to uid {uid}",
        f"chown {uid}:" in prepared and prepared.count("chown") >= 2,
        prepared,
    )
    return {"socket_hostpath": sock_host.get("path"), "sock": sock,
            "gid": effective(spec, agentd, "runAsGroup"),
            "mode": int(env_str(agentd, "Z4J_SOCKET_MODE") or "0660", 8)}


def check_daemonset_app(docs, ds):
    name = "daemonset-app.example.yaml"
    deps = [d for d in docs.get(name, []) if d.get("kind") == "Deployment"]
    if not check(f"{name} holds a Deployment", len(deps) == 1) or ds is None:
        return
    doc = deps[0]
    spec = pod_spec(doc)
    for _, app in all_containers(spec):
        sock = env_str(app, "Z4J_SOCKET_PATH") or ""
        held = volume_for_path(app, sock)
        host = (volume(spec, held[1]).get("hostPath") or {}) if held else {}
        check(
            f"{name}: app {app['name']} reaches the node's socket directory {ds['socket_hostpath']}",
            host.get("path") == ds["socket_hostpath"]
            and posixpath.relpath(sock, held[0]) == posixpath.relpath(ds["sock"], "/run/z4j"),
            f"{held} {host}",
        )
        check(
            f"{name}: app {app['name']} is in the socket's group {ds['gid']}",
            ds["gid"] in groups_of(spec, app) or bool(ds["mode"] & 0o006),
            f"groups {sorted(groups_of(spec, app))}",
        )


def check_images(docs, version):
    images = {}
    for fname, loaded in docs.items():
        for doc in loaded:
            for _, c in all_containers(pod_spec(doc)):
                img = c.get("image", "")
                check(
                    f"{fname}: {c['name']} image {img} has a pinned tag",
                    ":" in img.rsplit("/", 1)[-1] and not img.endswith(":latest"),
                )
                if is_agentd(c):
                    images.setdefault(img, []).append(f"{fname}/{c['name']}")
    check(
        "every z4j-agentd container uses the same image",
        len(images) == 1,
        f"{images}",
    )
    if images:
        img = next(iter(images))
        check(f"the z4j-agentd image tag is the crate version {version}", img.endswith(f":{version}"), img)


def check_containerfile(info):
    check("Containerfile: runtime runs as uid 65532", info.get("user", "").split(":")[0] == "65532", info.get("user"))
    args = info.get("args", {})
    bases = [args.get(f.strip("${}"), f) if f.startswith("${") else f for f in info["from"]]
    check(
        "Containerfile: base images pinned (no :latest)",
        len(bases) >= 2 and all(":" in b.rsplit("/", 1)[-1] and not b.endswith(":latest") for b in bases),
        f"{bases}",
    )
    check(
        "Containerfile: builds with --release --locked",
        "cargo build --release --locked" in info["text"],
    )
    check(
        "Containerfile: ENTRYPOINT /usr/local/bin/z4j-agentd, CMD run",
        info.get("entrypoint") == '["/usr/local/bin/z4j-agentd"]' and info.get("cmd") == '["run"]',
        f"{info.get('entrypoint')} {info.get('cmd')}",
    )
    check(
        "Containerfile: HEALTHCHECK runs `z4j-agentd status` without a shell",
        'CMD ["/usr/local/bin/z4j-agentd", "status"]' in info.get("healthcheck", ""),
        info.get("healthcheck"),
    )
    vols = info.get("volume", "")
    state = info["env"].get("STATE_DIRECTORY", "")
    sock = info["env"].get("Z4J_SOCKET_PATH", "")
    check(
        "Containerfile: the spool and the socket are under declared volumes",
        any(state.startswith(v + "/") for v in re.findall(r'"([^"]+)"', vols))
        and posixpath.dirname(sock) in re.findall(r'"([^"]+)"', vols),
        f"VOLUME {vols}, STATE_DIRECTORY {state}, Z4J_SOCKET_PATH {sock}",
    )
    dockerignore = ROOT / ".dockerignore"
    check("a .dockerignore at the repository root (the build context)", dockerignore.is_file())


def main() -> int:
    docs = load_all()
    info = containerfile()
    known_env = daemon_env_names()
    check("the daemon's Z4J_* variable names were found in src/", {"Z4J_SOCKET_PATH", "Z4J_BRAIN_URL", "Z4J_TOKEN_FILE"} <= known_env)
    secret_name, secret_keys = check_secret(docs)
    for fname, loaded in docs.items():
        for doc in loaded:
            if doc.get("kind") in ("Deployment", "DaemonSet"):
                check_secret_refs(fname, doc, secret_name, secret_keys)
                check_security(fname, doc)
    check_sidecar(docs, info, known_env)
    ds = check_daemonset(docs, info, known_env)
    check_daemonset_app(docs, ds)
    check_images(docs, cargo_version())
    check_containerfile(info)
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
