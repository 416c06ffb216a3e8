"""Saturation and noise of the first frame of each bench clip (256x256): ffmpeg sources, then the
photographs panned.  python3 clip_stats.py PHOTO_DIR  (scripts/wm-photos.sh PHOTO_DIR)"""
import sys
import subprocess, numpy as np, glob, os
W=H=256
def frames(graph, n=2):
    out = subprocess.run(["ffmpeg","-v","error","-f","lavfi","-i",graph,"-vf",f"scale={W}:{H}:flags=bicubic,format=rgb24","-frames:v",str(n),"-f","rawvideo","-pix_fmt","rgb24","-"],capture_output=True,check=True).stdout
    return np.frombuffer(out,np.uint8).reshape(-1,H,W,3)
srcs=[]
for seed in range(3):
    srcs.append(f"testsrc2=size={W}x{H}:rate=24,hue=h={seed*40}")
    srcs.append(f"mandelbrot=size={W}x{H}:rate=24:start_scale={[3.0,1.5,0.8][seed]}")
    srcs.append(f"life=size={W}x{H}:rate=24:seed={seed}:ratio=0.3:mold=10:life_color=#c0a080:death_color=#203040:mold_color=#506030,gblur=sigma=1.2")
    srcs.append(f"cellauto=size={W}x{H}:rate=24:rule={[30,110,150][seed]}:seed={seed},gblur=sigma=1,eq=contrast=0.7")
    srcs.append(f"gradients=size={W}x{H}:rate=24:seed={seed}:speed=0.02,noise=alls=10:allf=t+u")
for p in sorted(glob.glob(sys.argv[1] + '/*')):
    srcs.append(f"movie={p},loop=loop=-1:size=1:start=0,setpts=N/24/TB,format=rgb24,scale='trunc(iw*max(1.5*{W}/iw,1.5*{H}/ih)/2)*2':'trunc(ih*max(1.5*{W}/iw,1.5*{H}/ih)/2)*2',crop={W}:{H}:x='min(n*3,iw-{W})':y='min(n,ih-{H})'")
for g in srcs:
    f=frames(g).astype(float)
    y=0.299*f[0,...,0]+0.587*f[0,...,1]+0.114*f[0,...,2]
    hh=(y[0::2,0::2]-y[0::2,1::2]-y[1::2,0::2]+y[1::2,1::2])/2
    sig=np.median(np.abs(hh))/0.6745
    head=np.minimum(f[0],255-f[0]).min(-1)
    clip=(head<3).mean()
    name=g.split('=')[0] if not g.startswith('movie') else os.path.basename(g.split(',')[0])
    print(f"{name:22s} noise {sig:6.2f} clipped {clip:5.2f}")
