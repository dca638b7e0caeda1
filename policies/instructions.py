"""An instruction of several steps, as the clauses a policy acts on one at a time.

"press the red button, then put the blue cube in the tray" asks for two things in order. A policy trained
on clause-labelled demonstrations (each step labelled with the clause it serves: `embodied.collect
clause_instructions=true`) is prompted with one clause at a time, and moves on once the arm has stood still
(`ActionChunkQueue`, with a policy's `instruction_clauses`). The clauses of a multi-step task are then the
instructions of its one-step tasks ("press the red button", "put the blue cube in the red tray"), whose
demonstrations train them as well.
"""
from __future__ import annotations

import re

# "A, then B" and "A and then B" order two clauses; so does "A and the ..." where B is A's verb with another
# object ("put the red cube in the red tray and the blue cube in the blue tray").
_THEN = re.compile(r",? (?:and )?then ")
_AND_THE = re.compile(r" and (?=the )")


def split_instruction(instruction: str) -> list[str]:
    """The clauses of `instruction`, in order (one for a one-step instruction). A clause without a verb of
    its own ("the blue cube in the blue tray") takes the verb of the clause before it ("put")."""
    text = " ".join(str(instruction).split())
    if not text:
        raise ValueError("an instruction must not be empty")
    clauses: list[str] = []
    for part in _THEN.split(text):
        pieces = _AND_THE.split(part)
        clauses.append(pieces[0])
        verb = pieces[0].split(" the ", 1)[0] if " the " in pieces[0] else ""
        for piece in pieces[1:]:
            clauses.append(f"{verb} {piece}" if verb else piece)
    if any(not clause.strip() for clause in clauses):
        raise ValueError(f"instruction {instruction!r} has an empty clause")
    return clauses
