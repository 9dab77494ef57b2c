# augbench: which extra training images help a classifier most, generated or retrieved?
#
# Path grammar (all outputs under results/<dataset>/, logs/ and benchmarks/ mirror it):
#   world/                                   toy world: target/{split}.parquet + images, pool/pool.parquet, classes.json
#   pool/parts/{part}.parquet                url/caption table of one download job
#   pool/shards/{part}.tar|.parquet|_stats.json   img2dataset webdataset shard, per-row status, failure counts
#   clip/model/                              toy CLIP trained in the workflow (clip.model: toy); else a folder or hub id
#   embed/pool/img_emb/img_emb_{part}.npy + metadata/metadata_{part}.parquet    clip-retrieval's layout and naming
#   embed/target/img_emb/{split}.npy + metadata/{split}.parquet
#   retrieve/{mode}/queries.npy|.parquet     query vectors per mode (training images / class prompts)
#   retrieve/search/{block}.npz              per-query top-k (score, part, row) over one block of pool parts
#   retrieve/{mode}/neighbors.parquet, stats.json   ranked candidates per class (n_aug x overfetch), with url/caption
#   retrieve/url_cache/                      remote pools: img2dataset shards by url, shared by both modes (not an output)
#   index/trained.index, parts/{ipart}.index, pool.index + pool.ivfdata, index_infos.json   the optional ANN index
#   diffusion/model/                         toy LDM trained in the workflow (diffusion.model: toy); else a folder or hub id
# {method} below is a results row: a method, or with `generators` a generated method on one generator variant,
# <method>@<generator>[-g<guidance>] (personalize/: <method>@<generator>, shared by the generator's guidance scales)
#   personalize/{method}/block_{b}/{cls}/    learned_embeds.safetensors | cond.safetensors (+ LoRA weights or unet/);
#                                            links into personalize/{method}/cache/{cls}/<key>/
#   generate/{method}/block_{b}/{cls}/       manifest.parquet (pointers) + chunks/ (links into generate/{method}/cache/)
#   augment/{method}/manifest.parquet        pointers (shard, offset, size) + fidelity.json, judge.json, image_stats.json;
#                                            retrieval: images.tar; a filtered row <row>+<filter> (`filters`): filter.json,
#                                            its candidates under augment/{method}/candidates/
#   decoded/{split}/, decoded/augment/{method}/   the classifier's decode cache (uint8 images.npy, memory-mapped)
#   judge/metrics.json, model.pt             the judge classifier (report.judge)
#   train/{method}/{n_aug}/{seed}/metrics.json, model.pt
#   report/results.csv|md|html, cost.csv, accuracy_vs_naug.png, grids/{method}.png

from snakemake.utils import min_version

min_version("9.0")


configfile: "config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/models.smk"
include: "workflow/rules/world.smk"
include: "workflow/rules/download.smk"
include: "workflow/rules/pretrain.smk"
include: "workflow/rules/embed.smk"
include: "workflow/rules/retrieve.smk"
include: "workflow/rules/index.smk"
include: "workflow/rules/personalize.smk"
include: "workflow/rules/generate.smk"
include: "workflow/rules/filter.smk"
include: "workflow/rules/classify.smk"
include: "workflow/rules/report.smk"


rule all:
    input:
        rules.report.output,
    default_target: True
