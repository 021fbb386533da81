#!/usr/bin/env bash
# The `make demo` job on the embedded default data (synthetic phantoms):
# synthesise -> check -> train (3D CT and 2D chest X-ray) -> predict the held-out cases.
set -euo pipefail
MEDSEG="${MEDSEG:-medseg}"
PYTHON="${PYTHON:-$(dirname "$(command -v "$MEDSEG")")/python}"
DEMO_DIR="${DEMO_DIR:-demo_out}"
CT_CASES="${CT_CASES:-10}"
CXR_CASES="${CXR_CASES:-20}"
TRAIN_ARGS="${TRAIN_ARGS:-}"   # e.g. TRAIN_ARGS="--set train.epochs=2" for a quick look

mkdir -p "$DEMO_DIR"
# The demo owns these folders: regenerate them from the seed each run.
rm -rf "$DEMO_DIR/ct" "$DEMO_DIR/chest_xray" "$DEMO_DIR/runs" "$DEMO_DIR/predictions"

echo "== 1/5 synthetic CT phantoms ($CT_CASES cases, MSD layout, some held-out cases also as DICOM)"
"$MEDSEG" data synth ct --out "$DEMO_DIR/ct" --cases "$CT_CASES" --seed 0 --no-progress
echo "== 2/5 synthetic chest X-ray phantoms ($CXR_CASES cases, SCR layout)"
"$MEDSEG" data synth chest_xray --out "$DEMO_DIR/chest_xray" --cases "$CXR_CASES" --seed 0 --no-progress

echo "== 3/5 dataset checks"
"$MEDSEG" data check --config configs/demo_ct.yaml --set data.root="$DEMO_DIR/ct" --no-progress
"$MEDSEG" data check --config configs/demo_chest_xray.yaml --set data.root="$DEMO_DIR/chest_xray" --no-progress
first_dicom=$(ls -d "$DEMO_DIR"/ct/dicomTs/*/ 2>/dev/null | head -n 1 || true)
if [ -n "$first_dicom" ]; then "$MEDSEG" info "$first_dicom"; fi

echo "== 4/5 training (3D CT, then 2D chest X-ray)"
# shellcheck disable=SC2086
"$MEDSEG" train --config configs/demo_ct.yaml --set data.root="$DEMO_DIR/ct" \
    --set train.cache_dir="$DEMO_DIR/cache" --run-dir "$DEMO_DIR/runs/ct" --no-progress $TRAIN_ARGS
# shellcheck disable=SC2086
"$MEDSEG" train --config configs/demo_chest_xray.yaml --set data.root="$DEMO_DIR/chest_xray" \
    --set train.cache_dir="$DEMO_DIR/cache" --run-dir "$DEMO_DIR/runs/chest_xray" --no-progress $TRAIN_ARGS

echo "== held-out Dice (original grids)"
"$PYTHON" scripts/heldout_dice.py --model "$DEMO_DIR/runs/ct"
"$PYTHON" scripts/heldout_dice.py --model "$DEMO_DIR/runs/chest_xray"

echo "== 5/5 prediction on the held-out cases (NIfTI, DICOM series and PNG inputs)"
"$MEDSEG" predict --model "$DEMO_DIR/runs/ct" --input "$DEMO_DIR/ct/imagesTs" \
    --output "$DEMO_DIR/predictions/ct" --no-progress
# the DICOM copies have the same case ids: their own output folder
# (--format both: a NIfTI label map and a DICOM SEG per series)
"$MEDSEG" predict --model "$DEMO_DIR/runs/ct" --input "$DEMO_DIR/ct/dicomTs" \
    --output "$DEMO_DIR/predictions/ct_dicom" --format both --no-progress
cxr_test=()
while read -r case_id; do
    case "$case_id" in ""|\#*) continue ;; esac
    cxr_test+=("$DEMO_DIR/chest_xray/images/$case_id.png")
done < "$DEMO_DIR/chest_xray/test.txt"
"$MEDSEG" predict --model "$DEMO_DIR/runs/chest_xray" --input "${cxr_test[@]}" \
    --output "$DEMO_DIR/predictions/chest_xray" --no-progress

echo "== evaluation of the CT predictions against the held-out reference labels"
"$MEDSEG" evaluate --pred "$DEMO_DIR/predictions/ct" --ref "$DEMO_DIR/ct/labelsTs" --labels "$DEMO_DIR/runs/ct" \
    --distances --output "$DEMO_DIR/evaluation/ct"

echo "== organ-volume report for one predicted phantom"
first_ct=$(ls "$DEMO_DIR"/ct/imagesTs/*.nii.gz | head -n 1)
report_case=$(basename "$first_ct" .nii.gz)
report_case=${report_case%_0000}
"$MEDSEG" report --image "$first_ct" --mask "$DEMO_DIR/predictions/ct/$report_case.nii.gz" \
    --model "$DEMO_DIR/runs/ct" --output "$DEMO_DIR/reports/$report_case"

echo
echo "Demo outputs:"
echo "  CT phantoms (MSD layout):          $DEMO_DIR/ct"
echo "  chest X-ray phantoms (SCR layout): $DEMO_DIR/chest_xray"
echo "  trained models (run directories):  $DEMO_DIR/runs/ct  $DEMO_DIR/runs/chest_xray"
echo "    training curves:                 $DEMO_DIR/runs/ct/curves.png  $DEMO_DIR/runs/chest_xray/curves.png"
echo "  CT label maps (input geometry):    $DEMO_DIR/predictions/ct  (DICOM inputs: $DEMO_DIR/predictions/ct_dicom)"
echo "  CT DICOM SEG objects:             $DEMO_DIR/predictions/ct_dicom/*_seg.dcm"
echo "  chest X-ray masks (PNG per structure): $DEMO_DIR/predictions/chest_xray"
echo "  CT evaluation (metrics.csv, summary.json, Dice box plot): $DEMO_DIR/evaluation/ct"
echo "  organ-volume report:               $DEMO_DIR/reports/$report_case/report.html (and report.pdf)"
