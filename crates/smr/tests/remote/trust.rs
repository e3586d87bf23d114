//! Trust against a real registry: the node's policy (signatures, pins,
//! owner key) among genuine and attacker artifacts, `--index` mode, and
//! `smr verify --reproduce`.

use crate::servers::Registry;
use crate::util::*;
use std::path::{Path, PathBuf};
use std::process::Command;

const PASSWORD: &str = "correct horse";

/// `smr keygen --cosign -o DIR/NAME`: returns (private, public) paths.
fn cosign_pair(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let prefix = dir.join(name);
    ok(smr()
        .args(["keygen", "--cosign", "-o"])
        .arg(&prefix)
        .env("COSIGN_PASSWORD", PASSWORD));
    (
        dir.join(format!("{name}.key")),
        dir.join(format!("{name}.pub")),
    )
}

/// `smr convert IMAGE --push --no-encrypt` with `extra`; returns the
/// artifact's digest and stderr.
fn push_public(image: &str, extra: &[&str]) -> (String, String) {
    let out = ok(smr()
        .args(["convert", image, "--push", "--no-encrypt", "--no-optimize"])
        .args(extra)
        .env("COSIGN_PASSWORD", PASSWORD));
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    let digest = err
        .split("pushed smr artifact ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .unwrap_or_else(|| panic!("no artifact digest in: {err}"))
        .to_string();
    (digest, err)
}

/// A registry holding the synthetic image as `synth:v1` (not converted),
/// and its `docker://` name; `None` (test skipped) without the tools.
fn registry_with_synthetic() -> Option<(Registry, Synthetic, String)> {
    let reg = Registry::start(None)?;
    let s = Synthetic::new();
    reg.push_layout(
        &s.t.path().join("layout"),
        smr_testkit::SYNTHETIC_TAG,
        "synth:v1",
        None,
    );
    let image = reg.image("synth:v1");
    Some((reg, s, image))
}

/// `smr extract IMAGE` at info level with `args`; returns the output.
fn extract(image: &str, out: &Path, args: &[&str]) -> std::process::Output {
    run(smr()
        .args(["extract", image, "-o"])
        .arg(out)
        .args(["--log", "info"])
        .args(args))
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn a_node_runs_only_what_its_policy_trusts_whatever_the_digests() {
    let Some((_reg, s, image)) = registry_with_synthetic() else {
        return;
    };
    let d = s.t.path();
    let (good_key, good_pub) = cosign_pair(d, "good");
    let (evil_key, evil_pub) = cosign_pair(d, "evil");
    let (_, stranger_pub) = cosign_pair(d, "stranger");
    let good_key = good_key.to_str().unwrap();
    let (genuine, err) = push_public(&image, &["--sign-key", good_key]);
    assert!(err.contains("signed smr artifact"), "{err}");
    // Anyone who can push attaches artifacts: unsigned ones until one has
    // a smaller digest than the genuine, and one signed by another key.
    let mut ground = None;
    for n in 1..=24 {
        let (d, _) = push_public(&image, &["--pack-chunks", &n.to_string()]);
        if d < genuine {
            ground = Some(d);
            break;
        }
    }
    let ground = ground.expect("no smaller digest in 24 tries");
    let (evil, _) = push_public(
        &image,
        &[
            "--pack-chunks",
            "99",
            "--sign-key",
            evil_key.to_str().unwrap(),
        ],
    );

    // A node trusting the good key runs the genuine artifact and names
    // the ones it refused on the way.
    let o = extract(
        &image,
        &d.join("a.img"),
        &["--verify-key", good_pub.to_str().unwrap()],
    );
    let e = stderr(&o);
    assert!(o.status.success(), "{e}");
    assert!(e.contains("trusted: signed") && e.contains(&genuine), "{e}");
    assert!(
        e.contains("smr artifact refused") && e.contains(&ground),
        "{e}"
    );
    assert!(!e.contains(&format!("artifact={ground} key")), "{e}");

    // A node trusting only a key that signed nothing refuses every one,
    // naming each and why.
    let o = extract(
        &image,
        &d.join("b.img"),
        &["--verify-key", stranger_pub.to_str().unwrap()],
    );
    let e = stderr(&o);
    assert!(!o.status.success());
    let last = e.lines().last().unwrap_or_default();
    assert!(last.contains("no trusted smr artifact"), "{e}");
    for digest in [&genuine, &ground, &evil] {
        assert!(last.contains(digest.as_str()), "{digest} not named: {last}");
    }
    assert!(
        last.contains("no signature") && last.contains("by no trusted key"),
        "{last}"
    );
    assert!(!d.join("b.img").exists(), "nothing written on refusal");

    // A pinned digest is trusted as it is.
    let o = extract(
        &image,
        &d.join("c.img"),
        &[
            "--verify-key",
            stranger_pub.to_str().unwrap(),
            "--pin",
            &evil,
        ],
    );
    let e = stderr(&o);
    assert!(o.status.success() && e.contains("trusted: pinned"), "{e}");

    // The policy directory: keys/*.pub and pinned.
    let policy = d.join("policy");
    std::fs::create_dir_all(policy.join("keys")).unwrap();
    std::fs::copy(&evil_pub, policy.join("keys/evil.pub")).unwrap();
    std::fs::write(policy.join("pinned"), format!("# pinned\n{ground}\n")).unwrap();
    let show = ok(smr()
        .args(["policy", "show", "--json"])
        .env("SMR_POLICY_DIR", &policy));
    let v: serde_json::Value = serde_json::from_slice(&show.stdout).unwrap();
    assert_eq!(v["signing_keys"][0]["name"], "evil.pub", "{v}");
    assert_eq!(v["pinned"][0], ground.as_str(), "{v}");
    let o = run(smr()
        .args(["extract", &image, "-o"])
        .arg(d.join("e.img"))
        .args(["--log", "info"])
        .env("SMR_POLICY_DIR", &policy));
    let e = stderr(&o);
    assert!(o.status.success(), "{e}");
    // Both `ground` (pinned) and `evil` (signed by a key of the
    // directory) are trusted; the one that sorts first is used.
    if ground < evil {
        assert!(e.contains("trusted: pinned") && e.contains(&ground), "{e}");
    } else {
        assert!(e.contains("trusted: signed") && e.contains(&evil), "{e}");
    }
}

#[test]
fn an_owner_key_node_refuses_unsealed_and_foreign_artifacts() {
    let Some((_reg, s, image)) = registry_with_synthetic() else {
        return;
    };
    let d = s.t.path();
    let other = d.join("other.key");
    std::fs::write(&other, format!("{}\n", "cd".repeat(32))).unwrap();
    let key = s.key.to_str().unwrap();
    // The attacker's artifacts only: unsealed, and sealed under another key.
    push_public(&image, &[]);
    ok(smr()
        .args(["convert", &image, "--push", "--no-optimize", "--key-file"])
        .arg(&other));
    let o = extract(&image, &d.join("x.img"), &["--key-file", key]);
    let e = stderr(&o);
    assert!(!o.status.success(), "{e}");
    let last = e.lines().last().unwrap_or_default();
    assert!(
        last.contains("not encrypted") && last.contains("does not open with the owner key"),
        "{last}"
    );
    // `smr run` refuses the same way, before anything starts.
    let o = run(smr()
        .args(["run", &image, "--key-file", key, "--", "/bin/true"])
        .env("SMR_CACHE_DIR", d.join("cache")));
    let e = stderr(&o);
    assert!(
        !o.status.success() && e.contains("no trusted smr artifact"),
        "{e}"
    );
    // Then the owner's own: used, whatever the digests.
    ok(smr().args([
        "convert",
        &image,
        "--push",
        "--no-optimize",
        "--key-file",
        key,
    ]));
    let o = extract(&image, &d.join("y.img"), &["--key-file", key]);
    assert!(o.status.success(), "{}", stderr(&o));
    // `smr policy show` names the owner key by id, never its bytes.
    let show = ok(smr().args(["policy", "show", "--key-file", key]));
    let text = String::from_utf8_lossy(&show.stdout);
    assert!(
        text.contains("owner key:") && text.contains("(a)"),
        "{text}"
    );
    let secret = std::fs::read_to_string(&s.key).unwrap();
    assert!(!text.contains(secret.trim()), "{text}");
}

#[test]
fn index_mode_keeps_the_image_pullable_and_names_the_artifact() {
    let Some((_reg, s, image)) = registry_with_synthetic() else {
        return;
    };
    let d = s.t.path();
    let raw = |img: &str| -> serde_json::Value {
        let out = ok(Command::new("skopeo")
            .args(["inspect", "--raw", "--tls-verify=false"])
            .arg(img));
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let digest_of = |img: &str| -> String {
        let out = ok(Command::new("skopeo")
            .args(["inspect", "--tls-verify=false", "--format", "{{.Digest}}"])
            .arg(img));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let original = digest_of(&image);
    let (sign_key, sign_pub) = cosign_pair(d, "k");
    let sign = sign_key.to_str().unwrap();
    let (artifact, err) = push_public(&image, &["--index", "--sign-key", sign]);
    assert!(
        err.contains("pushed image index") && err.contains("signed image index"),
        "{err}"
    );
    // Twice: the index still holds one smr entry.
    push_public(&image, &["--index", "--sign-key", sign]);
    let index = raw(&image);
    assert_eq!(
        index["mediaType"],
        "application/vnd.oci.image.index.v1+json"
    );
    let entries = index["manifests"].as_array().unwrap();
    assert_eq!(entries.len(), 2, "{index}");
    assert_eq!(entries[0]["digest"], original.as_str(), "{index}");
    assert_eq!(entries[1]["digest"], artifact.as_str(), "{index}");
    assert_eq!(entries[1]["artifactType"], "application/vnd.smr.image.v1");

    // Other tools still pull the original image from the tag.
    ok(Command::new("skopeo")
        .args([
            "copy",
            "--quiet",
            "--preserve-digests",
            "--src-tls-verify=false",
        ])
        .arg(&image)
        .arg(format!("oci:{}:pulled", d.join("pulled").display())));
    let layout: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d.join("pulled/index.json")).unwrap()).unwrap();
    assert_eq!(
        layout["manifests"][0]["digest"],
        original.as_str(),
        "{layout}"
    );

    // smr finds the artifact in the index: no referrers lookup.
    let o = run(smr()
        .args(["extract", &image, "-o"])
        .arg(d.join("i.img"))
        .args(["--log", "debug", "--verify-key", sign_pub.to_str().unwrap()]));
    let e = stderr(&o);
    assert!(o.status.success(), "{e}");
    assert!(e.contains("smr artifact named by the image index"), "{e}");
    let image_referrers = e
        .lines()
        .any(|l| l.contains("referrers from the") && l.contains(&original));
    assert!(!image_referrers, "the image's referrers were listed: {e}");
}

#[test]
fn verify_reproduce_passes_for_the_genuine_artifact_and_names_the_forged_chunk() {
    let Some((_reg, s, image)) = registry_with_synthetic() else {
        return;
    };
    let d = s.t.path();
    let key = s.key.to_str().unwrap();
    // Encrypted and zstd: every option comes from the artifact.
    ok(smr().args([
        "convert",
        &image,
        "--push",
        "--no-optimize",
        "--key-file",
        key,
        "--compress",
        "zstd",
    ]));
    let o = run(smr().args(["verify", "--reproduce", &image, "--key-file", key]));
    let e = stderr(&o);
    assert!(
        o.status.success() && e.contains("reproduced:") && e.contains("zstd level 9"),
        "{e}"
    );

    // A public artifact whose recipe claims this image but was made from
    // an image with one more layer.
    let mut img = smr_testkit::synthetic_image();
    let mut extra = smr_testkit::LayerBuilder::new();
    extra.file("etc/motd", b"forged\n", 0o644);
    img.layer(extra.into_bytes(), smr_testkit::Compression::None);
    let forged_layout = d.join("forged");
    img.write_oci_layout(&forged_layout, Some("f")).unwrap();
    let store = d.join("forged-store");
    let recipe = d.join("forged.recipe");
    ok(smr()
        .args([
            "convert",
            &format!("oci:{}:f", forged_layout.display()),
            "--no-encrypt",
            "--store",
        ])
        .arg(&store)
        .arg("-o")
        .arg(&recipe));
    let mut forged = smr_format::Recipe::decode(&std::fs::read(&recipe).unwrap()).unwrap();
    let name = image.strip_prefix("docker://").unwrap();
    let opts = smr_registry::client::RegistryOptions::from_env();
    let iref = smr_registry::reference::ImageRef::parse(name).unwrap();
    let repo = smr_registry::client::Repository::open(&iref, &opts).unwrap();
    let (media_type, bytes) = smr_registry::Blobs::get_manifest(&repo, "v1")
        .unwrap()
        .unwrap();
    let subject = smr_registry::artifact::Descriptor::of(&media_type, &bytes);
    forged.source_digest = subject.digest.clone();
    let forged_bytes = forged.encode();
    let local = smr_store::LocalStore::open(&store).unwrap();
    let pushed = smr_registry::push::push(
        &repo,
        &subject,
        &forged_bytes,
        &local,
        &smr_registry::push::PushOptions::default(),
    )
    .unwrap();
    let o = run(smr().args([
        "verify",
        "--reproduce",
        &image,
        "--artifact",
        &pushed.manifest_digest,
    ]));
    let e = stderr(&o);
    assert!(!o.status.success(), "{e}");
    let last = e.lines().last().unwrap_or_default();
    assert!(
        last.contains(&pushed.manifest_digest) && last.contains("first difference: chunk #"),
        "{last}"
    );
}

#[test]
fn no_secret_reaches_any_output_even_at_trace_level() {
    let creds = "smr:s3cret-Pa55word";
    let Some(reg) = Registry::start(Some(creds)) else {
        return;
    };
    let s = Synthetic::new();
    let d = s.t.path();
    reg.push_layout(
        &d.join("layout"),
        smr_testkit::SYNTHETIC_TAG,
        "synth:v1",
        Some(creds),
    );
    let image = reg.image("synth:v1");
    let (sign_key, sign_pub) = cosign_pair(d, "k");
    let owner = std::fs::read_to_string(&s.key).unwrap().trim().to_string();
    let private = std::fs::read_to_string(&sign_key).unwrap();
    let body: String = private.lines().nth(2).unwrap().to_string();
    use base64::Engine as _;
    let basic = base64::engine::general_purpose::STANDARD.encode(creds);
    let secrets = [
        "s3cret-Pa55word",
        basic.as_str(),
        owner.as_str(),
        PASSWORD,
        body.as_str(),
    ];
    let key = s.key.to_str().unwrap();
    let wrong = d.join("wrong.key");
    std::fs::write(&wrong, format!("{}\n", "ab".repeat(32))).unwrap();
    let runs: Vec<Vec<String>> = [
        vec![
            "convert",
            &image,
            "--push",
            "--no-optimize",
            "--key-file",
            key,
            "--sign-key",
            sign_key.to_str().unwrap(),
            "--index",
        ],
        vec![
            "extract",
            &image,
            "-o",
            d.join("x.img").to_str().unwrap(),
            "--key-file",
            key,
            "--verify-key",
            sign_pub.to_str().unwrap(),
        ],
        vec!["verify", &image, "--key-file", key],
        vec!["verify", "--reproduce", &image, "--key-file", key],
        vec!["policy", "show", "--key-file", key, "--json"],
        vec![
            "extract",
            &image,
            "-o",
            d.join("y.img").to_str().unwrap(),
            "--key-file",
            wrong.to_str().unwrap(),
        ],
    ]
    .iter()
    .map(|v| v.iter().map(|s| s.to_string()).collect())
    .collect();
    for args in &runs {
        let o = run(smr()
            .args(args)
            .args(["--log", "trace"])
            .env("SMR_REGISTRY_CREDS", creds)
            .env("COSIGN_PASSWORD", PASSWORD));
        let all = format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        if args[0] != "policy" {
            assert!(
                all.len() > 1000,
                "trace output expected for {args:?}: {all}"
            );
        }
        for secret in secrets {
            assert!(!all.contains(secret), "{args:?} printed a secret: {all}");
        }
    }
}

#[test]
fn gc_of_a_repository_deletes_only_the_referrers_of_deleted_images() {
    let Some((reg, s, image)) = registry_with_synthetic() else {
        return;
    };
    let d = s.t.path();
    let (key, _) = cosign_pair(d, "k");
    let (gone_artifact, _) = push_public(&image, &["--sign-key", key.to_str().unwrap()]);
    // A second image that stays, with its artifact.
    let mut img = smr_testkit::synthetic_image();
    let mut extra = smr_testkit::LayerBuilder::new();
    extra.file("etc/motd", b"stays\n", 0o644);
    img.layer(extra.into_bytes(), smr_testkit::Compression::None);
    img.write_oci_layout(&d.join("v2"), Some("v2")).unwrap();
    reg.push_layout(&d.join("v2"), "v2", "synth:v2", None);
    let (kept_artifact, _) = push_public(&reg.image("synth:v2"), &[]);
    let repo = reg.image("synth");
    let tags = |t: &str| -> Vec<String> {
        let out = ok(Command::new("skopeo")
            .args(["list-tags", "--tls-verify=false"])
            .arg(t));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v["Tags"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_str().unwrap().to_string())
            .collect()
    };
    let before = tags(&repo);
    // Nothing is gone yet: nothing to do.
    let o = ok(smr().args(["gc", &repo, "--json"]));
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r["deleted"].as_array().unwrap().len(), 0, "{r}");
    // Delete v1's manifest, as `regctl`/the registry API would.
    let digest = String::from_utf8_lossy(
        &ok(Command::new("skopeo")
            .args(["inspect", "--tls-verify=false", "--format", "{{.Digest}}"])
            .arg(&image))
        .stdout,
    )
    .trim()
    .to_string();
    let url = format!("http://{}/v2/synth/manifests/{digest}", reg.addr);
    ok(Command::new("curl").args(["-fsS", "-X", "DELETE", &url]));
    // A dry run reports and deletes nothing.
    let o = ok(smr().args(["gc", &repo, "--dry-run", "--json"]));
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(r["deleted"].to_string().contains(&gone_artifact), "{r}");
    assert_eq!(tags(&repo).len(), before.len() - 1, "only v1's tag went");
    let o = ok(smr().args(["gc", &repo, "--json"]));
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(r["deleted"].to_string().contains(&gone_artifact), "{r}");
    let left = tags(&repo);
    let gone_hex = gone_artifact.trim_start_matches("sha256:");
    assert!(
        !left.iter().any(|t| t.contains(gone_hex)),
        "signature tags left: {left:?}"
    );
    assert!(left.contains(&"v2".to_string()));
    // The artifact of the image that stays is still found and used.
    let o = ok(smr()
        .args(["extract", &reg.image("synth:v2"), "-o"])
        .arg(d.join("v2.img"))
        .args(["--log", "info"]));
    assert!(stderr(&o).contains(&kept_artifact), "{}", stderr(&o));
    let e = fails(smr().args(["extract", &image, "-o"]).arg(d.join("v1.img")));
    assert!(e.contains("v1"), "{e}");
}
