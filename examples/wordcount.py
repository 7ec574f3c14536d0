"""Word count with MapReduce over text files.

Run it (4 ranks: rank 0 schedules, 3 workers map, shuffle and reduce):

    pydra run -n 4 examples/wordcount.py:WordCount examples/data/*.txt
    mpiexec -n 4 python -m pydra run examples/wordcount.py:WordCount examples/data/*.txt --output counts.json

Each INPUT is a file path; workers read the files themselves. The (word, 1)
pairs are combined on the mapping worker, then shuffled between workers with
MPI collectives; rank 0 only receives the final counts.
"""

import re

import pydra

WORD = re.compile(r"[a-z']+")


class WordCount(pydra.MapReduce):
    def map(self, path):
        with open(path, encoding="utf-8") as text:
            for line in text:
                for word in WORD.findall(line.lower()):
                    yield word, 1

    def combine(self, word, counts):
        return sum(counts)

    def reduce(self, word, counts):
        return sum(counts)
