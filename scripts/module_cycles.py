#!/usr/bin/env python3
"""Import circles between fedgate's modules.

Reads every `crate::a::b...` path in src/ (comments and `#[cfg(test)]` parts left
out) and prints, per module at the given depth (1: the top-level folders; 2: their
modules), the modules it uses, then the groups of modules that use each other in a
circle. Usage: scripts/module_cycles.py [DEPTH]   (run from the repository root)
"""
import re, os, sys, itertools
from collections import defaultdict
root='src'
level = int(sys.argv[1]) if len(sys.argv)>1 else 1
edges=defaultdict(set)
def modname(path):
    rel=os.path.relpath(path,root)[:-3].split('/')
    if rel[-1]=='mod': rel=rel[:-1]
    return rel
for dp,_,fs in os.walk(root):
    for f in fs:
        if not f.endswith('.rs') or f in ('main.rs',): continue
        p=os.path.join(dp,f); m=modname(p)
        src=open(p).read()
        src=re.sub(r'(?m)^\s*//.*$','',src)
        # drop test modules
        i=src.find('#[cfg(test)]')
        if i>=0: src=src[:i]
        for t in re.findall(r'crate::([a-z_]+(?:::[a-z_]+)*)',src):
            parts=t.split('::')
            a='::'.join(m[:level]); b='::'.join(parts[:level])
            if a and b and a!=b: edges[a].add(b)
# find cycles (SCCs)
idx={}; low={}; st=[]; on=set(); sccs=[]; c=[0]
def strong(v):
    idx[v]=low[v]=c[0]; c[0]+=1; st.append(v); on.add(v)
    for w in edges.get(v,()):
        if w not in idx: strong(w); low[v]=min(low[v],low[w])
        elif w in on: low[v]=min(low[v],idx[w])
    if low[v]==idx[v]:
        comp=[]
        while True:
            w=st.pop(); on.discard(w); comp.append(w)
            if w==v: break
        if len(comp)>1: sccs.append(comp)
for v in list(edges): 
    if v not in idx: strong(v)
for k in sorted(edges):
    print(k, '->', sorted(edges[k]))
print('circles:', sccs if sccs else 'none')
