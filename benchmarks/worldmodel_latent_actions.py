"""Latent action model (Genie's LAM) of a world model, on held-out episodes.

    python benchmarks/worldmodel_latent_actions.py --worldmodel RUN/worldmodel --data HELDOUT_BUILDER_DIR \\
        [--train-data TRAIN_BUILDER_DIR] [--spec embodied]

For every transition (frame t → t+1) of the held-out episodes, the latent action model infers the
latent action from both frames' tokens, and its decoder predicts frame t+1's tokens from frame t's
tokens and that latent (argmax). Reported:

* codebook usage: the perplexity of the inferred latents (exp of their entropy; 8 = all 8 codes
  equally) and how many codes are used;
* next-frame token accuracy (all tokens, and the tokens that change) and PSNR (the predicted tokens
  decoded by the tokenizer, against the real frame t+1; PSNR of the error pooled over all
  transitions) with the inferred latent, with a uniformly random latent, and copying frame t (its
  tokens; and the real frame t, for PSNR); Genie's controllability ΔPSNR = PSNR(inferred latent) −
  PSNR(random latent); the tokenizer's own reconstruction of frame t+1 bounds the decoded PSNR;
* how much of the true robot action the latents capture, though the model never saw an action:
  the action a_t taken between the frames is discretized (the sign of the dominant translation axis
  among dx, dy, dz, or `still` when all three are below --still-m, plus gripper open/closed), and
  the normalized mutual information (arithmetic normalization, as scikit-learn's default) between
  the latent id and that label, with random ids for reference (a finite sample gives random ids a
  small positive NMI); and the accuracy of predicting the label from the latent id (the majority
  label of each code, fitted on --train-data's transitions, else on the held-out ones themselves)
  against always predicting the majority label;
* with --train-data and --probe-steps N (> 0), a control: the same encoder architecture, freshly
  initialized, trained with the labels (supervised inverse dynamics, N steps of batch 64, AdamW 1e-3)
  and tested on the held-out transitions: how much of the label the token pairs carry at all.
"""
from __future__ import annotations

import argparse
import json
import time
from collections import Counter

import numpy as np
import torch


def action_labels(actions: np.ndarray, still_m: float) -> tuple[np.ndarray, np.ndarray]:
    """Raw actions (N, 7) → (translation label: '+x', '-z', ... or 'still'; gripper label 'open'/'closed')."""
    translation = actions[:, :3]
    axis = np.abs(translation).argmax(1)
    value = translation[np.arange(len(actions)), axis]
    moves = np.array([("+" if v > 0 else "-") + "xyz"[a] for a, v in zip(axis, value)], dtype=object)
    moves[np.abs(translation).max(1) < still_m] = "still"
    gripper = np.where(actions[:, 6] > 0.5, "open", "closed").astype(object)
    return moves, gripper


def entropy(labels) -> float:
    counts = np.array(list(Counter(labels).values()), np.float64)
    p = counts / counts.sum()
    return float(-(p * np.log(p)).sum())


def nmi(a, b) -> float:
    """Normalized mutual information I(a; b) / mean(H(a), H(b)) of two label sequences."""
    a, b = list(a), list(b)
    h_a, h_b = entropy(a), entropy(b)
    mutual = h_a + h_b - entropy(list(zip(a, b)))
    return float(mutual / ((h_a + h_b) / 2)) if h_a + h_b > 0 else 0.0


def majority_map(ids: np.ndarray, labels: np.ndarray) -> tuple[dict, object]:
    """The majority label of each code, and the overall majority label (for codes never seen)."""
    overall = Counter(labels).most_common(1)[0][0]
    return {int(c): Counter(labels[ids == c]).most_common(1)[0][0] for c in np.unique(ids)}, overall


def transitions_of(world, episodes, seed: int):
    """predict_transitions over the episodes, with the raw action of each transition and the real frames."""
    from embodied.train_worldmodel import tokenize_episodes
    from worldmodel.latent_actions import predict_transitions

    tokenize_episodes(world.tokenizer, episodes, show_progress=False)
    t = predict_transitions(world.latent_actions, [e.tokens.astype(np.int64) for e in episodes], seed)
    usable = [e for e in episodes if len(e) >= 2]
    t["actions"] = np.concatenate([e.actions[:-1] for e in usable])  # a_t: taken from frame t, leads to t+1
    t["frame_prev"] = np.concatenate([e.images[:-1] for e in usable])
    t["frame_next"] = np.concatenate([e.images[1:] for e in usable])
    return t


def probe_accuracy(config, train_t: dict, train_labels: np.ndarray, t: dict, labels: np.ndarray, steps: int,
                   seed: int) -> float:
    """Held-out accuracy of a supervised inverse-dynamics probe: a fresh LAM encoder + a linear head on the labels."""
    from worldmodel.latent_actions import LatentActionModel

    torch.manual_seed(seed)
    classes = sorted(set(train_labels) | set(labels))
    index = {c: i for i, c in enumerate(classes)}
    encoder = LatentActionModel(config)
    head = torch.nn.Linear(config.latent_dim, len(classes))
    params = [p for name, p in encoder.named_parameters() if not name.startswith(("decoder", "action_in", "head"))]
    opt = torch.optim.AdamW(params + list(head.parameters()), lr=1e-3)
    prev, nxt = torch.from_numpy(train_t["prev"]), torch.from_numpy(train_t["next"])
    y = torch.tensor([index[c] for c in train_labels])
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        i = torch.from_numpy(rng.integers(0, len(y), 64))
        loss = torch.nn.functional.cross_entropy(head(encoder.encode(prev[i], nxt[i])), y[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        logits = head(encoder.encode(torch.from_numpy(t["prev"]), torch.from_numpy(t["next"])))
    return float((logits.argmax(-1).numpy() == np.array([index[c] for c in labels])).mean())


def decoded(world, tokens: np.ndarray, batch: int = 256) -> np.ndarray:
    return np.concatenate([world.decode(torch.from_numpy(tokens[i:i + batch].astype(np.int64)))
                           for i in range(0, len(tokens), batch)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worldmodel", required=True)
    parser.add_argument("--data", required=True, help="held-out RLDS dataset (builder dir, name or mixture)")
    parser.add_argument("--train-data", default=None, help="the training dataset, to fit each code's majority label")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--split", default="train")
    parser.add_argument("--spec", default=None)
    parser.add_argument("--still-m", type=float, default=0.002, help="translation below this (m) on every axis: still")
    parser.add_argument("--probe-steps", type=int, default=0, help="> 0 (with --train-data): the supervised probe")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from worldmodel.data import load_episodes
    from worldmodel.latent_actions import transition_metrics
    from worldmodel.metrics import pooled_psnr
    from worldmodel.model import WorldModel

    started = time.time()
    world = WorldModel.from_pretrained(args.worldmodel)
    if world.latent_actions is None:
        raise SystemExit(f"{args.worldmodel} has no latent action model (train_worldmodel stage 'latent_actions')")
    n = world.latent_actions.config.n_latent_actions

    def read(data):
        episodes, _, _ = load_episodes(data, args.data_dir, args.split, world.image_size, args.spec,
                                       statistics=world.statistics, show_progress=False,
                                       fallback_statistics=world.statistics.get(world.statistics_key))
        return episodes, transitions_of(world, episodes, args.seed)

    episodes, t = read(args.data)
    metrics = transition_metrics(t, n)
    real_next = t["frame_next"]
    psnr = {"inferred": pooled_psnr(decoded(world, t["pred"]), real_next),
            "random": pooled_psnr(decoded(world, t["pred_random"]), real_next),
            "copy_tokens": pooled_psnr(decoded(world, t["prev"]), real_next),
            "copy_frame": pooled_psnr(t["frame_prev"], real_next),
            "tokenizer": pooled_psnr(decoded(world, t["next"]), real_next)}

    moves, gripper = action_labels(t["actions"], args.still_m)
    joint = np.array([f"{m}/{g}" for m, g in zip(moves, gripper)], dtype=object)
    random_ids = np.random.default_rng(args.seed + 1).integers(0, n, len(t["ids"]))
    train_t, fitted_on = t, "held-out (in-sample)"
    if args.train_data:
        train_t, fitted_on = read(args.train_data)[1], "train"
    train_moves, train_gripper = action_labels(train_t["actions"], args.still_m)
    train_joint = np.array([f"{m}/{g}" for m, g in zip(train_moves, train_gripper)], dtype=object)
    information = {}
    for name, labels, fit_labels in (("translation+gripper", joint, train_joint), ("translation", moves, train_moves),
                                     ("gripper", gripper, train_gripper)):
        mapping, overall = majority_map(train_t["ids"], fit_labels)
        predicted = np.array([mapping.get(int(c), overall) for c in t["ids"]], dtype=object)
        row = {"classes": len(set(labels)), "nmi": nmi(t["ids"], labels), "nmi_random_ids": nmi(random_ids, labels),
               "from_latent_accuracy": float((predicted == labels).mean()), "majority_class": overall,
               "majority_accuracy": float((labels == overall).mean())}
        if args.train_data and args.probe_steps > 0:
            row["probe_accuracy"] = probe_accuracy(world.latent_actions.config, train_t, fit_labels, t, labels,
                                                   args.probe_steps, args.seed)
        information[name] = row
    per_code = []
    for c in range(n):
        sel = t["ids"] == c
        top = Counter(joint[sel]).most_common(2)
        per_code.append({"code": c, "share": float(sel.mean()),
                         "top_labels": [(label, round(k / max(sel.sum(), 1), 2)) for label, k in top],
                         "changed_tokens": float((t["prev"][sel] != t["next"][sel]).mean()) if sel.any() else 0.0})

    result = {"episodes": len(episodes), **metrics, "psnr": psnr, "delta_psnr": psnr["inferred"] - psnr["random"],
              "information": information, "per_code": per_code, "labels_fitted_on": fitted_on,
              "label_counts": dict(Counter(joint).most_common()), "seconds": round(time.time() - started, 1)}
    print(f"{metrics['transitions']} transitions from {len(episodes)} held-out episodes; "
          f"{metrics['codes_used']}/{n} codes used, perplexity {metrics['perplexity']:.2f} (of {n})")
    print("| next frame from frame t | token accuracy | changed-token accuracy | PSNR (dB) |")
    print("|---|---|---|---|")
    print(f"| LAM decoder, inferred latent | {metrics['accuracy_inferred']:.3f} | "
          f"{metrics['changed_accuracy_inferred']:.3f} | {psnr['inferred']:.2f} |")
    print(f"| LAM decoder, random latent | {metrics['accuracy_random']:.3f} | "
          f"{metrics['changed_accuracy_random']:.3f} | {psnr['random']:.2f} |")
    print(f"| copy frame t (tokens / real frame) | {metrics['accuracy_copy']:.3f} | "
          f"{metrics['changed_accuracy_copy']:.3f} | {psnr['copy_tokens']:.2f} / {psnr['copy_frame']:.2f} |")
    print(f"| tokenizer reconstruction of t+1 (bound) | 1.000 | 1.000 | {psnr['tokenizer']:.2f} |")
    print(f"ΔPSNR inferred − random latent: {result['delta_psnr']:+.2f} dB")
    print(f"true action label from the latent id: majority label per code, fitted on {fitted_on}'s transitions; "
          f"probe: the encoder trained on the labels ({args.probe_steps} steps; 0 = not run)")
    print("| true action label | classes | NMI(latent id, label) | NMI(random id, label) | from latent id "
          "| majority class | supervised probe |")
    print("|---|---|---|---|---|---|---|")
    for name, row in information.items():
        probe = f"{row['probe_accuracy']:.3f}" if "probe_accuracy" in row else "-"
        print(f"| {name} | {row['classes']} | {row['nmi']:.3f} | {row['nmi_random_ids']:.3f} | "
              f"{row['from_latent_accuracy']:.3f} | {row['majority_accuracy']:.3f} ({row['majority_class']}) | "
              f"{probe} |")
    print("| code | share | most common labels | changed tokens |")
    print("|---|---|---|---|")
    for row in per_code:
        labels = ", ".join(f"{label} {share:.2f}" for label, share in row["top_labels"])
        print(f"| {row['code']} | {row['share']:.3f} | {labels} | {row['changed_tokens']:.3f} |")
    print(f"labels: {result['label_counts']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2, default=str)


if __name__ == "__main__":
    main()
